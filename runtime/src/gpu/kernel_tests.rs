//! Tests that need a device (a GPU, or the CUDA stand-in; skipped without one unless
//! `OPENLORA_REQUIRE_GPU` is set): the attention kernels against their CPU reference
//! (`openlora_kernels::attention`) over contexts of several score tiles, KV blocks in shuffled
//! order, grouped-query heads, decode and prefill rows. (A step allocating no device memory is
//! tested with the harness's random decoder, in `harness::gpu_random`.)

use cudarc::driver::PushKernelArg;
use half::bf16;
use openlora_kernels::attention::{KvLayer, KvShape, SeqAttention, paged_attention};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Gpu;

/// The GPU the tests run on, if the machine has one (required when `OPENLORA_REQUIRE_GPU` is set).
pub(crate) fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(std::env::var_os("OPENLORA_REQUIRE_GPU").is_none(), "a GPU was required: {e}");
            None
        }
    }
}

/// Random values already rounded to bf16, so the f32 reference sees what the device sees.
fn values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)).to_f32()).collect()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// The attention kernels' `window` argument for full attention.
const NO_WINDOW: i32 = 0;

#[test]
fn attention_matches_the_cpu_reference_over_contexts_of_many_tiles() {
    let Some(gpu) = gpu() else { return };
    // A head narrower than the block, and one wider (each thread accumulates two dimensions).
    attention_case(&gpu, KvShape { block_size: 16, kv_heads: 2, heads: 4, head_dim: 48 });
    attention_case(&gpu, KvShape { block_size: 16, kv_heads: 1, heads: 2, head_dim: 160 });
}

fn attention_case(gpu: &Gpu, shape: KvShape) {
    // Contexts of 700 and 300 tokens (the kernels score 256 keys a tile), blocks shuffled.
    let contexts = [700usize, 300];
    let max_blocks = contexts[0].div_ceil(shape.block_size);
    let total_blocks = contexts.iter().map(|c| c.div_ceil(shape.block_size)).sum::<usize>();
    let mut rng = StdRng::seed_from_u64(11);
    let mut order: Vec<u32> = (0..total_blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let tables: Vec<Vec<u32>> = {
        let mut at = 0;
        contexts
            .iter()
            .map(|c| {
                let n = c.div_ceil(shape.block_size);
                at += n;
                order[at - n..at].to_vec()
            })
            .collect()
    };
    let mut k = values(&mut rng, total_blocks * shape.block_elems());
    // Later tiles of the long sequence score higher, so the running maximum grows and the earlier
    // tiles' sums must be rescaled.
    for t in 0..contexts[0] {
        let at = shape.offset(&tables[0], t);
        for x in &mut k[at..at + shape.token_elems()] {
            *x = bf16::from_f32(*x * (1.0 + (t / 256) as f32)).to_f32();
        }
    }
    let v = values(&mut rng, total_blocks * shape.block_elems());
    let row_elems = shape.heads * shape.head_dim;
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let flat_tables: Vec<u32> =
        tables.iter().flat_map(|t| t.iter().copied().chain(std::iter::repeat(0)).take(max_blocks)).collect();
    let (k_dev, v_dev, tables_dev) = (
        gpu.upload(&to_bf16(&k)).expect("device call"),
        gpu.upload(&to_bf16(&v)).expect("device call"),
        gpu.upload(&flat_tables).expect("device call"),
    );
    let (mb, nh, nkv, hd, bs) =
        (max_blocks as i32, shape.heads as i32, shape.kv_heads as i32, shape.head_dim as i32, shape.block_size as i32);
    let worst =
        |got: &[bf16], want: &[f32]| got.iter().zip(want).map(|(g, w)| (g.to_f32() - w).abs()).fold(0f32, f32::max);

    // Decode: each sequence's last token.
    let q = values(&mut rng, contexts.len() * row_elems);
    let seqs: Vec<SeqAttention<'_>> = contexts
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(i, (&context, t))| SeqAttention { row: i, new_tokens: 1, context, blocks: t })
        .collect();
    let mut want = vec![0f32; q.len()];
    paged_attention(shape, KvLayer { k: &k, v: &v }, &q, &mut want, &seqs, scale, None);
    let (q_dev, lens) =
        (gpu.upload(&to_bf16(&q)).expect("device call"), gpu.upload(&contexts.map(|c| c as u32)).expect("device call"));
    let mut out = gpu.zeros::<bf16>(q.len()).expect("device call");
    let mut b = gpu.stream.launch_builder(gpu.kernel("paged_attention_decode_bf16").expect("device call"));
    b.arg(&mut out).arg(&q_dev).arg(&k_dev).arg(&v_dev).arg(&tables_dev).arg(&lens);
    b.arg(&mb).arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale).arg(&NO_WINDOW);
    // SAFETY: out and q hold 2 rows of heads × head_dim; the tables name blocks below total_blocks.
    unsafe { b.launch(super::model::attention_grid(shape.heads, 2)) }.expect("device call");
    let d = worst(&gpu.download(&out).expect("device call"), &want);
    assert!(d < 1e-2, "decode: max |Δ| {d} against the CPU reference");

    // Prefill under a sliding window of 301 tokens: three rows of the long sequence, at 255, 256
    // (the window wider than the context) and 699 (the window starting mid-block, at 399), and one
    // of the other.
    let (window, window_i) = (301usize, 301i32);
    let rows = [(0usize, 255usize), (0, 256), (0, 699), (1, 42)];
    let q = values(&mut rng, rows.len() * row_elems);
    let mut want = vec![0f32; q.len()];
    for (r, &(s, pos)) in rows.iter().enumerate() {
        let one = SeqAttention { row: 0, new_tokens: 1, context: pos + 1, blocks: &tables[s] };
        let mut o = vec![0f32; row_elems];
        let q_row = &q[r * row_elems..][..row_elems];
        paged_attention(shape, KvLayer { k: &k, v: &v }, q_row, &mut o, &[one], scale, Some(window));
        want[r * row_elems..][..row_elems].copy_from_slice(&o);
    }
    let row_seq: Vec<u32> = rows.iter().map(|r| r.0 as u32).collect();
    let row_pos: Vec<u32> = rows.iter().map(|r| r.1 as u32).collect();
    let (q_dev, seq_dev, pos_dev) = (
        gpu.upload(&to_bf16(&q)).expect("device call"),
        gpu.upload(&row_seq).expect("device call"),
        gpu.upload(&row_pos).expect("device call"),
    );
    let mut out = gpu.zeros::<bf16>(q.len()).expect("device call");
    let mut b = gpu.stream.launch_builder(gpu.kernel("paged_attention_prefill_bf16").expect("device call"));
    b.arg(&mut out).arg(&q_dev).arg(&k_dev).arg(&v_dev).arg(&tables_dev).arg(&seq_dev).arg(&pos_dev);
    b.arg(&mb).arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale).arg(&window_i);
    // SAFETY: out and q hold 4 rows of heads × head_dim; each row's position is inside its table.
    unsafe { b.launch(super::model::attention_grid(shape.heads, rows.len())) }.expect("device call");
    let d = worst(&gpu.download(&out).expect("device call"), &want);
    assert!(d < 1e-2, "prefill: max |Δ| {d} against the CPU reference");
}

/// A step may hold more rows than a grid's y dimension (65,535): `max_batch_tokens` is the
/// operator's to raise. Each row here attends to one cached token, so its output is that
/// token's value.
#[test]
fn prefill_attention_takes_more_rows_than_a_grid_dimension_holds() {
    let Some(gpu) = gpu() else { return };
    let rows = 65_536 + 7;
    let (hd, bs) = (32usize, 16usize);
    let v: Vec<f32> = (0..bs * hd).map(|i| ((i % hd) as f32 - 16.0) / 8.0).collect();
    let k = vec![0.5f32; bs * hd];
    let q = vec![bf16::from_f32(0.25); rows * hd];
    let (k_dev, v_dev) =
        (gpu.upload(&to_bf16(&k)).expect("device call"), gpu.upload(&to_bf16(&v)).expect("device call"));
    let (table, row_seq, row_pos) = (
        gpu.upload(&[0u32]).expect("device call"),
        gpu.upload(&vec![0u32; rows]).expect("device call"),
        gpu.upload(&vec![0u32; rows]).expect("device call"),
    );
    let q_dev = gpu.upload(&q).expect("device call");
    let mut out = gpu.zeros::<bf16>(rows * hd).expect("device call");
    let (mb, one, hd_i, bs_i, scale) = (1i32, 1i32, hd as i32, bs as i32, 1.0f32);
    let mut b = gpu.stream.launch_builder(gpu.kernel("paged_attention_prefill_bf16").expect("kernel"));
    b.arg(&mut out).arg(&q_dev).arg(&k_dev).arg(&v_dev).arg(&table).arg(&row_seq).arg(&row_pos);
    b.arg(&mb).arg(&one).arg(&one).arg(&hd_i).arg(&bs_i).arg(&scale).arg(&NO_WINDOW);
    // SAFETY: out and q hold rows × head_dim; every row reads block 0's first token.
    unsafe { b.launch(super::model::attention_grid(1, rows)) }.expect("a launch of this many rows");
    let got = gpu.download(&out).expect("device call");
    for r in [0, 65_535, rows - 1] {
        for d in 0..hd {
            assert_eq!(got[r * hd + d].to_f32(), bf16::from_f32(v[d]).to_f32(), "row {r}, dim {d}");
        }
    }
}

/// Device sampling names a token of the vocabulary for every row, even one whose logits are all
/// NaN or -inf (an adapter with broken weights): before, such a row came back as 0x7fffffff,
/// which failed the next step of every request batched with it.
#[test]
fn device_argmax_names_a_token_for_rows_of_nan_and_minus_infinity() {
    let Some(gpu) = gpu() else { return };
    let vocab = 300usize;
    let mut logits = vec![f32::NAN; vocab];
    logits.extend(vec![f32::NEG_INFINITY; vocab]);
    logits.extend((0..vocab).map(|i| if i == 123 { 5.0 } else { 0.0 }));
    let dev = gpu.upload(&logits).expect("device call");
    let (t, seeds) = (gpu.upload(&[0.0f32; 3]).expect("device call"), gpu.upload(&[0u64; 3]).expect("device call"));
    let mut out = gpu.zeros::<u32>(3).expect("device call");
    let v = vocab as i32;
    let mut b = gpu.stream.launch_builder(gpu.kernel("sample_rows").expect("kernel"));
    b.arg(&dev).arg(&v).arg(&t).arg(&seeds).arg(&mut out);
    // SAFETY: 3 rows of `vocab` logits, 3 temperatures, seeds and ids; 256 threads (a power of two).
    unsafe { b.launch(super::grid((3, 1), 256, 0)) }.expect("launch");
    assert_eq!(gpu.download(&out).expect("device call"), [0, 0, 123]);
}
