//! Sets `openlora bench --device cpu`'s report beside `bench/hf_peft_baseline.py`'s (same model,
//! adapters and requests, one machine): the README's performance tables and the chart's series,
//! every ratio computed from the two JSON files alone.

use serde_json::Value;

use super::chart::Series;

/// The best (highest) mixed-adapter tok/s PEFT reached at batch `b` over its dtypes, and which.
fn peft_best<'a>(peft: &'a Value, b: &str, mode: &str) -> Option<(&'a str, f64)> {
    peft["by_dtype"]
        .as_object()?
        .iter()
        .filter_map(|(d, r)| Some((d.as_str(), r["batches"][b][mode]["tok_per_s"].as_f64()?)))
        .max_by(|x, y| x.1.total_cmp(&y.1))
}

/// The markdown tables: fixed batches, then the S-LoRA workload per rate.
pub fn markdown(ours: &Value, peft: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.1}"));
    let mut s = format!(
        "Model: Llama, hidden {}, {} layers, vocab {}; rank-{} adapters on q/k/v/o; {} prompt + {} new tokens, greedy. \
         openlora in {} ({} KV cache) on {} ({} threads); PEFT with torch {} ({} threads).\n\n",
        ours["model"]["hidden"],
        ours["model"]["layers"],
        ours["model"]["vocab"],
        ours["rank"],
        ours["prompt"],
        ours["new_tokens"],
        ours["dtype"].as_str().unwrap_or("?"),
        ours["kv_cache_dtype"].as_str().unwrap_or("f32"),
        ours["isa"].as_str().unwrap_or("?"),
        ours["threads"],
        peft["torch"].as_str().unwrap_or("?"),
        peft["threads"],
    );
    let dtypes: Vec<&String> = peft["by_dtype"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
    s.push_str("| batch |");
    for d in &dtypes {
        s.push_str(&format!(" HF PEFT {d} base / mixed (tok/s) |"));
    }
    s.push_str(" openlora base / mixed (tok/s) | openlora mixed / base | openlora / PEFT's best, mixed |\n|---|");
    s.push_str(&"---|".repeat(dtypes.len() + 3));
    s.push('\n');
    if let Some(batches) = ours["batches"].as_object() {
        for (b, r) in batches {
            s.push_str(&format!("| {b} |"));
            for d in &dtypes {
                let p = &peft["by_dtype"][d.as_str()]["batches"][b.as_str()];
                s.push_str(&format!(" {} / {} |", f(&p["base"]["tok_per_s"]), f(&p["mixed"]["tok_per_s"])));
            }
            let mixed = r["mixed"]["tok_per_s"].as_f64().unwrap_or(0.0);
            let ratio =
                peft_best(peft, b, "mixed").map_or("–".into(), |(d, p)| format!("**{:.2}x** (vs {d})", mixed / p));
            s.push_str(&format!(
                " {} / {} | {:.2}x | {ratio} |\n",
                f(&r["base"]["tok_per_s"]),
                f(&r["mixed"]["tok_per_s"]),
                r["mixed_over_base"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    s.push_str("\n| S-LoRA workload (rate) | openlora tok/s | TTFT p50 / p99 (s) | SLO met |");
    for d in &dtypes {
        s.push_str(&format!(" HF PEFT {d} tok/s | TTFT p99 (s) | SLO met |"));
    }
    s.push_str("\n|---|---|---|---|");
    s.push_str(&"---|---|---|".repeat(dtypes.len()));
    s.push('\n');
    for (i, r) in ours["workload"].as_array().into_iter().flatten().enumerate() {
        s.push_str(&format!(
            "| {} req/s, {} adapters, Zipf {} | {} | {:.2} / {:.2} | {:.0}% |",
            r["spec"]["rate"],
            r["spec"]["adapters"],
            r["spec"]["zipf_exponent"],
            f(&r["tok_per_s"]),
            r["ttft_s"]["p50"].as_f64().unwrap_or(0.0),
            r["ttft_s"]["p99"].as_f64().unwrap_or(0.0),
            r["slo"]["attainment"].as_f64().unwrap_or(0.0) * 100.0
        ));
        for d in &dtypes {
            let p = &peft["by_dtype"][d.as_str()]["workload"][i];
            s.push_str(&format!(
                " {} | {:.2} | {:.0}% |",
                f(&p["tok_per_s"]),
                p["ttft_s"]["p99"].as_f64().unwrap_or(0.0),
                p["slo"]["attainment"].as_f64().unwrap_or(0.0) * 100.0
            ));
        }
        s.push('\n');
    }
    s
}

/// The chart's series: openlora, then PEFT in each dtype.
pub fn series<'a>(ours: &'a Value, peft: &'a Value) -> Vec<(String, Vec<(f64, f64, f64)>)> {
    let points = |runs: &Value| -> Vec<(f64, f64, f64)> {
        runs.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["spec"]["rate"].as_f64()?, r["tok_per_s"].as_f64()?, r["ttft_s"]["p99"].as_f64()?)))
            .collect()
    };
    let mut out = vec![(format!("openlora {}", ours["dtype"].as_str().unwrap_or("")), points(&ours["workload"]))];
    for (d, r) in peft["by_dtype"].as_object().into_iter().flatten() {
        out.push((format!("HF PEFT {d}"), points(&r["workload"])));
    }
    out
}

/// [`series`] borrowed as the chart takes them.
pub fn as_chart(series: &[(String, Vec<(f64, f64, f64)>)]) -> Vec<Series<'_>> {
    series.iter().map(|(n, p)| Series { name: n, points: p.clone() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios_are_against_peft_best_dtype() {
        let ours = json!({"model": {"hidden": 8, "layers": 1, "vocab": 10}, "rank": 4, "prompt": 2, "new_tokens": 2,
            "dtype": "bf16", "isa": "avx2", "threads": 2,
            "batches": {"16": {"base": {"tok_per_s": 600.0}, "mixed": {"tok_per_s": 510.0}, "mixed_over_base": 1.05}},
            "workload": [{"spec": {"rate": 2.0, "adapters": 100, "zipf_exponent": 1.0}, "tok_per_s": 50.0,
                          "ttft_s": {"p50": 0.1, "p99": 0.3}, "slo": {"attainment": 1.0}}]});
        let peft = json!({"torch": "2", "threads": 2, "by_dtype": {
            "f32": {"batches": {"16": {"base": {"tok_per_s": 190.0}, "mixed": {"tok_per_s": 137.0}}},
                    "workload": [{"tok_per_s": 10.0, "ttft_s": {"p99": 9.0}, "slo": {"attainment": 0.5}}]},
            "bf16": {"batches": {"16": {"base": {"tok_per_s": 436.0}, "mixed": {"tok_per_s": 170.0}}},
                     "workload": [{"tok_per_s": 12.0, "ttft_s": {"p99": 8.0}, "slo": {"attainment": 0.25}}]}}});
        let md = markdown(&ours, &peft);
        assert!(md.contains("**3.00x** (vs bf16)"), "{md}");
        assert!(md.contains("| 2.0 req/s, 100 adapters, Zipf 1.0 | 50.0 | 0.10 / 0.30 | 100% |"), "{md}");
        let s = series(&ours, &peft);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].1, vec![(2.0, 50.0, 0.3)]);
    }
}
