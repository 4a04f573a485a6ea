//! The `openlora` binary as a user runs it.

mod common;

use std::process::{Command, Output};

fn openlora(args: &[&str]) -> Output {
    let home = std::env::temp_dir().join(format!("openlora-cli-home-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_openlora")).args(args).env("OPENLORA_HOME", &home).output().expect("run openlora")
}

/// `openlora bench --compare OURS --baseline PEFT`: the comparison tables of two reports.
fn compare(ours: &std::path::Path, peft: &std::path::Path) -> Output {
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    openlora(&["bench", "--device", "cpu", "--compare", &path(ours), "--baseline", &path(peft)])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_command() {
    let o = openlora(&["--help"]);
    assert!(o.status.success());
    let text = stdout(&o);
    for cmd in ["generate", "serve", "plugin"] {
        assert!(text.contains(cmd), "--help does not list `{cmd}`:\n{text}");
    }
}

#[test]
fn generate_runs_on_the_embedded_model_and_seeds_repeat() {
    let args = ["generate", "--prompt", "The cat", "--max-tokens", "24", "--temperature", "0.9", "--seed", "11"];
    let a = openlora(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = openlora(&args);
    assert_eq!(stdout(&a), stdout(&b), "same seed, different text");
    assert!(stdout(&a).starts_with("The cat"), "the prompt is echoed first");
    assert!(stdout(&a).len() > "The cat\n".len(), "something was generated");
    assert!(stderr(&a).contains("generated tokens"), "{}", stderr(&a));
    let other: Vec<String> = (12..16)
        .map(|seed| {
            let seed = seed.to_string();
            let mut args = args.to_vec();
            *args.last_mut().expect("seed arg") = &seed;
            stdout(&openlora(&args))
        })
        .collect();
    assert!(other.iter().any(|o| *o != stdout(&a)), "other seeds never change the text");
}

#[test]
fn stop_strings_end_generation() {
    let o = openlora(&["generate", "--prompt", "A", "--max-tokens", "64", "--stop", " ", "--temperature", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let generated = text.trim_end_matches('\n').strip_prefix('A').expect("prompt echoed");
    assert!(!generated.contains(' '), "stop string was printed: {text:?}");
}

#[test]
fn missing_model_folder_is_named() {
    let o = openlora(&["generate", "--model", "/nonexistent/model-dir", "--prompt", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/model-dir"), "{}", stderr(&o));
}

#[test]
fn bad_sampling_parameter_is_named() {
    let o = openlora(&["generate", "--prompt", "x", "--temperature", "-1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));
}

#[test]
fn demo_adapters_change_the_output() {
    let base = ["generate", "--prompt", "The captain said", "--max-tokens", "24", "--temperature", "0"];
    let plain = openlora(&base);
    assert!(plain.status.success(), "{}", stderr(&plain));
    for adapter in ["startrek", "computers", "love"] {
        let mut args = base.to_vec();
        args.extend(["--adapter", adapter]);
        let o = openlora(&args);
        assert!(o.status.success(), "{adapter}: {}", stderr(&o));
        assert_ne!(stdout(&o), stdout(&plain), "adapter {adapter} did not change the greedy output");
        assert!(stderr(&o).contains(&format!("adapter {adapter}")));
    }
}

#[test]
fn unknown_adapter_is_named() {
    let o = openlora(&["generate", "--prompt", "x", "--adapter", "no-such-adapter"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-adapter"), "{}", stderr(&o));
}

#[test]
fn plugin_check_dry_runs_a_good_plugin_and_names_what_is_wrong_with_bad_ones() {
    let dir = common::temp_dir("plugin-check");
    let good = dir.join("attributor.wasm");
    std::fs::write(&good, common::plugin_wasm("openlora-plugin-proportional-attributor")).unwrap();
    let o = openlora(&["plugin", "check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("attributor plugin") && text.contains("sha256"), "{text}");
    assert!(text.contains("sample 3:") && text.contains("replays exactly") && text.contains("fuel"), "{text}");
    assert!(text.contains("µs of CPU time of a 100 ms deadline"), "{text}");
    // A built-in sample where the adapter barely contributed, with a charge to split.
    assert!(text.contains("contribution 20000 ppm; charge"), "{text}");
    let o = openlora(&["plugin", "check", good.to_str().unwrap(), "--slot", "operator"]);
    assert!(o.status.success() && stdout(&o).contains("sample 4:"), "{}", stderr(&o));
    let o = openlora(&["plugin", "check", good.to_str().unwrap(), "--plugin-config", r#"{"operator_ppm": 2000000}"#]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("attributor.wasm") && stderr(&o).contains("operator_ppm"), "{}", stderr(&o));
    let o = openlora(&["plugin", "check", good.to_str().unwrap(), "--world", "router"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not export openlora:policy/routing"), "{}", stderr(&o));

    let fs = dir.join("fs.wasm");
    std::fs::write(&fs, common::plugin_wasm("openlora-test-fs-reader")).unwrap();
    let o = openlora(&["plugin", "check", fs.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fs.wasm") && stderr(&o).contains("wasi:filesystem"), "{}", stderr(&o));

    let hostile = dir.join("hostile.wasm");
    std::fs::write(&hostile, common::plugin_wasm("openlora-test-hostile")).unwrap();
    let o =
        openlora(&["plugin", "check", hostile.to_str().unwrap(), "--plugin-config", r#"{"mode": "loop"}"#, "--json"]);
    assert!(!o.status.success());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(report["ok"], false);
    assert!(report["samples"][0]["failure"].as_str().unwrap().contains("fuel"), "{report}");

    let samples = dir.join("samples.json");
    std::fs::write(&samples, r#"[{"request": {"request_id": "r", "tenant": "t", "requested_model": "m", "adapter": "m"}, "usage": {"completion_tokens": 10, "adapter_contribution_ppm": 500000}, "charge": {"amount": 10, "currency": "EUR"}}]"#).unwrap();
    let o = openlora(&["plugin", "check", good.to_str().unwrap(), "--samples", samples.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(r#""payee":"owner:m""#), "{}", stdout(&o));
    std::fs::write(&samples, r#"[{"request": {"request_id": 5}}]"#).unwrap();
    let o = openlora(&["plugin", "check", good.to_str().unwrap(), "--samples", samples.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("samples.json") && stderr(&o).contains("request_id"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serving_on_a_gpu_that_is_not_there_says_so_and_fails() {
    let o = openlora(&["serve", "--device", "cuda:0", "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("cuda:0"), "{err}");
    let o = openlora(&["serve", "--device", "tpu"]);
    assert!(!o.status.success() && stderr(&o).contains("is not a device"), "{}", stderr(&o));
}

#[test]
fn ledger_commands_name_a_missing_ledger_and_bad_flags() {
    let o = openlora(&["ledger", "verify", "--ledger", "/nonexistent/ledger.sqlite3"]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/ledger.sqlite3"), "{}", stderr(&o));
    let o = openlora(&["ledger", "summary", "--by", "colour", "--ledger", "/tmp"]);
    assert!(!o.status.success() && stderr(&o).contains("--by"), "{}", stderr(&o));
    let o = openlora(&["ledger", "export", "--since", "yesterday", "--ledger", "/tmp"]);
    assert!(!o.status.success(), "{}", stderr(&o));
}

/// `openlora bench --device cpu` on a fixture model: fixed batches, the S-LoRA workload (the
/// same seed, the same requests), its JSON and SVG; then `--compare` against a baseline report.
#[test]
fn the_cpu_bench_runs_the_workload_and_compares_with_a_baseline() {
    let root = common::repo_root();
    let dir = std::env::temp_dir().join(format!("openlora-cli-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let model = root.join("tests/fixtures/models/gqa-llama3-f32");
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    let run = |out: &std::path::Path| {
        openlora(&[
            "bench",
            "--device",
            "cpu",
            "--model",
            model.to_str().expect("utf-8"),
            "--dtype",
            "bf16",
            "--fixtures",
            root.join("tests/fixtures").to_str().expect("utf-8"),
            "--batches",
            "2",
            "--prompt",
            "4",
            "--new-tokens",
            "2",
            "--workload-adapters",
            "3",
            "--requests",
            "6",
            "--rates",
            "100",
            "--prompt-len",
            "2-5",
            "--output-len",
            "2",
            "--keep",
            dir.join("data").to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
            "--svg",
            svg.to_str().expect("utf-8"),
        ])
    };
    let o = run(&json);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("json");
    assert_eq!(r["dtype"], "bf16");
    assert_eq!(r["batches"]["2"]["mixed"]["tokens"], 4);
    let w = &r["workload"][0];
    assert_eq!((w["requests"].as_u64(), w["spec"]["rate"].as_f64()), (Some(6), Some(100.0)));
    assert!(std::fs::read_to_string(&svg).expect("svg").starts_with("<svg"));
    let again = dir.join("again.json");
    assert!(run(&again).status.success());
    let r2: serde_json::Value = serde_json::from_slice(&std::fs::read(&again).expect("report")).expect("json");
    assert_eq!(r2["workload"][0]["arrivals"], w["arrivals"], "the seed fixes the request sequence");

    // A baseline in bench/hf_peft_baseline.py's shape (here: our own figures, so 1.00x).
    let baseline = serde_json::json!({"torch": "test", "threads": 1, "by_dtype": {"bf16": {
        "batches": r["batches"], "workload": r["workload"]}}});
    let peft = dir.join("peft.json");
    std::fs::write(&peft, baseline.to_string()).expect("write");
    let o = compare(&json, &peft);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("**1.00x** (vs bf16)"), "{}", stdout(&o));
    let o = openlora(&["bench", "--device", "cpu", "--rates", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("--rates"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's performance tables are `openlora bench --compare` of the reports committed
/// under docs/perf (one `bench/compare.sh` run), so every figure in them can be recomputed.
#[test]
fn the_readme_performance_tables_are_the_committed_reports() {
    let root = common::repo_root();
    let perf = root.join("docs/perf");
    let (ours, peft) = (perf.join("openlora.json"), perf.join("peft.json"));
    let o = compare(&ours, &peft);
    assert!(o.status.success(), "{}", stderr(&o));
    let tables = stdout(&o);
    let committed = std::fs::read_to_string(perf.join("compare.md")).expect("docs/perf/compare.md");
    assert_eq!(tables.trim(), committed.trim(), "docs/perf/compare.md is not what its reports give");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(readme.contains(tables.trim()), "README.md's performance tables are not docs/perf's run");
}
