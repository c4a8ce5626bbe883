//! Recovery fine-tuning with LoRA adapters on pruned fixtures: untrained adapters change nothing,
//! merging equals base + adapters, the written folders reload to the merged function, a resumed
//! run ends at the uninterrupted adapters, and bad input is a one-line error with no output.

#[path = "../../disp-models/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{fixture, max_abs_diff, random_plan, to_vec};
use disp_export::ExportFormat;
use disp_models::CausalLm;
use disp_train::rng::SplitMix64;
use disp_train::{FinetuneConfig, FinetuneRequest, Finetuner, LoraAdapters, LoraTarget, Objective};

/// A pruned folder of fixture `name` (random plan), with the byte-level tokenizer, in `dir`.
fn pruned_folder(name: &str, dir: &Path) -> PathBuf {
    let dense = dir.join("dense");
    std::fs::create_dir_all(&dense).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dense.join(entry.file_name())).unwrap();
    }
    std::fs::copy(common::fixtures_dir().join("byte_tokenizer.json"), dense.join("tokenizer.json")).unwrap();
    let model = disp_models::load_model(&dense, &Device::flex()).unwrap();
    let plan = random_plan(model.as_ref(), 5);
    let out = dir.join("pruned");
    disp_export::export(&dense, &plan, ExportFormat::Pruned, &out).unwrap();
    out
}

fn load(dir: &Path) -> Box<dyn CausalLm> {
    disp_models::load_model(dir, &Device::flex()).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn windows(count: usize, seq: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(seed);
    (0..count).map(|_| (0..seq).map(|_| rng.below(256) as u32).collect()).collect()
}

fn tokens(model: &dyn CausalLm, window: &[u32]) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(window.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, window.len()]), model.device())
}

fn bits(t: Tensor<3>) -> Vec<u32> {
    to_vec(t).iter().map(|v| v.to_bits()).collect()
}

fn cfg(steps: usize) -> FinetuneConfig {
    FinetuneConfig { steps, rank: 2, alpha: 4.0, learning_rate: 1e-2, seed: 3, ..FinetuneConfig::default() }
}

fn factors(adapters: &LoraAdapters) -> Vec<u32> {
    let f = &adapters.factors;
    f.a.iter().chain(&f.b).flat_map(|p| to_vec(p.val()).into_iter().map(f32::to_bits)).collect()
}

#[test]
fn untrained_adapters_leave_the_logits_bit_identical_and_merging_is_base_plus_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pruned_folder("llama_gqa_tied", tmp.path());
    let mut model = load(&dir);
    let input = tokens(model.as_ref(), &windows(1, 12, 1)[0]);
    let before = bits(model.forward(input.clone(), None, None));

    let device = model.device().clone().autodiff();
    let mut adapters = LoraAdapters::new(model.as_mut(), &LoraTarget::ALL, 2, 4.0, 9, &device).unwrap();
    assert_eq!(adapters.sites.len(), 2 * 7, "every linear of both blocks");
    // B = 0: merging changes no weight bit, so the logits are bit-identical.
    adapters.merge(model.as_mut());
    assert!(bits(model.forward(input.clone(), None, None)) == before, "B = 0: the merged model is not the base model");
    // Installed for training, the weights are autodiff tensors and the forward takes the generic
    // path (the host attention fast path is for plain tensors only): same function, other rounding.
    adapters.install(model.as_mut());
    let installed = to_vec(model.forward(input.clone(), None, None).inner());
    let base_values: Vec<f32> = before.iter().map(|&b| f32::from_bits(b)).collect();
    assert!(max_abs_diff(&installed, &base_values) <= 1e-5, "B = 0 installed differs by {}", max_abs_diff(&installed, &base_values));
    adapters.restore(model.as_mut());

    // Non-zero B: the merged weight must compute x·W + s·(x·A)·B, written out here.
    let plain = model.device().clone();
    for (i, b) in adapters.factors.b.iter_mut().enumerate() {
        let dims = b.val().dims();
        let values: Vec<f32> = (0..dims[0] * dims[1]).map(|j| ((i * 31 + j * 7) % 13) as f32 / 13.0 - 0.5).collect();
        *b = burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(values, dims), &device));
    }
    let site = adapters.sites[3];
    let base = model.block_linears(site.layer).attn_output.clone();
    let x = Tensor::<3>::random([1, 5, base.inputs()], burn::tensor::Distribution::Normal(0.0, 1.0), &plain);
    let a = adapters.factors.a[3].val().inner();
    let b = adapters.factors.b[3].val().inner();
    let low_rank = x.clone().reshape([5, base.inputs()]).matmul(a).matmul(b).mul_scalar(adapters.scale()).reshape([1, 5, base.outputs()]);
    let expected = to_vec(base.forward(x.clone()) + low_rank);

    adapters.install(model.as_mut());
    let adapted = to_vec(model.forward(input.clone(), None, None).inner());
    adapters.merge(model.as_mut());
    let merged_linear = model.block_linears(site.layer).attn_output.clone();
    assert!(!merged_linear.weight.is_autodiff(), "merged weights are plain tensors");
    assert!(max_abs_diff(&to_vec(merged_linear.forward(x)), &expected) <= 1e-5);
    let merged = to_vec(model.forward(input, None, None));
    assert!(max_abs_diff(&merged, &adapted) <= 1e-5, "merged logits differ from base + adapters");
    assert!(max_abs_diff(&merged, &base_values) > 1e-3, "the adapters changed nothing");
}

#[test]
fn training_moves_both_factors_and_resuming_ends_at_the_uninterrupted_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pruned_folder("llama_gqa_tied", tmp.path());
    let data = windows(5, 16, 2);
    let run = |cfg: &FinetuneConfig, resume_after: Option<usize>| {
        let mut model = load(&dir);
        if let Some(stop) = resume_after {
            let first = FinetuneConfig { steps: cfg.steps, ..cfg.clone() };
            let mut tuner = Finetuner::new(model.as_mut(), None, &data, &first).unwrap();
            for _ in 0..stop {
                tuner.step().unwrap();
            }
            tuner.save_checkpoint(cfg.checkpoint.as_ref().unwrap()).unwrap();
        }
        let mut model = load(&dir);
        let mut tuner = Finetuner::new(model.as_mut(), None, &data, cfg).unwrap();
        if resume_after.is_some() {
            assert!(tuner.resume().unwrap());
        }
        let mut losses = Vec::new();
        while tuner.steps_done() < cfg.steps {
            losses.push(tuner.step().unwrap().lm_loss);
        }
        (factors(tuner.adapters()), losses)
    };
    let mut fresh = load(&dir);
    let device = fresh.device().clone().autodiff();
    let initial = factors(&LoraAdapters::new(fresh.as_mut(), &cfg(1).targets, 2, 4.0, 3, &device).unwrap());
    let (uninterrupted, losses) = run(&cfg(4), None);
    assert!(losses.iter().all(|l| l.is_finite()));
    let half = initial.len() / 2;
    assert_ne!(uninterrupted[..half], initial[..half], "A never moved");
    assert_ne!(uninterrupted[half..], initial[half..], "B never moved");

    let checkpoint = tmp.path().join("ft.bin");
    let resumed_cfg = FinetuneConfig { checkpoint: Some(checkpoint.clone()), resume: true, ..cfg(4) };
    let (resumed, _) = run(&resumed_cfg, Some(2));
    assert_eq!(resumed, uninterrupted, "resuming after 2 of 4 steps must end at the same adapters");

    // Another setting refuses the checkpoint.
    let mut model = load(&dir);
    let mut other = Finetuner::new(model.as_mut(), None, &data, &FinetuneConfig { rank: 3, ..resumed_cfg }).unwrap();
    assert!(format!("{:#}", other.resume().unwrap_err()).contains("different settings"));
}

fn request(dir: &Path, data: PathBuf, out: PathBuf, format: ExportFormat) -> FinetuneRequest {
    FinetuneRequest {
        model_dir: dir.to_path_buf(),
        teacher_dir: None,
        data: vec![data],
        eval: vec![],
        eval_windows: None,
        seq_len: 16,
        cfg: cfg(3),
        out,
        format,
    }
}

#[test]
fn written_folders_reload_to_the_merged_function() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pruned_folder("llama_gqa_tied", tmp.path());
    let text = tmp.path().join("train.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ".repeat(4),
    )
    .unwrap();
    let teacher = tmp.path().join("dense");

    let pruned_out = tmp.path().join("ft-pruned");
    let mut req = request(&dir, text.clone(), pruned_out.clone(), ExportFormat::Pruned);
    req.teacher_dir = Some(teacher.clone());
    req.cfg.objective = Objective::LmKd;
    let outcome = disp_train::finetune(&req, &Device::flex(), |_| {}).unwrap();
    assert_eq!(outcome.steps, 3);

    // The same run in memory.
    let windows = disp_train::prune::calibration_windows(&disp_models::TextTokenizer::load(&dir).unwrap(), std::slice::from_ref(&text), 16).unwrap();
    let mut model = load(&dir);
    let dense = load(&teacher);
    let mut tuner = Finetuner::new(model.as_mut(), Some(dense.as_ref()), &windows, &req.cfg).unwrap();
    for _ in 0..3 {
        tuner.step().unwrap();
    }
    tuner.finish();
    let input = tokens(model.as_ref(), &windows[0]);
    let expected = bits(model.forward(input.clone(), None, None));

    let reloaded = load(&pruned_out);
    assert!(reloaded.is_pruned());
    assert!(bits(reloaded.forward(input.clone(), None, None)) == expected, "the pruned folder does not reload to the merged model");
    let base = bits(load(&dir).forward(input.clone(), None, None));
    assert!(base != expected, "fine-tuning changed nothing");

    let dense_out = tmp.path().join("ft-dense");
    let mut req = FinetuneRequest { out: dense_out.clone(), format: ExportFormat::DenseEquivalent, ..req };
    req.cfg.objective = Objective::LmKd;
    disp_train::finetune(&req, &Device::flex(), |_| {}).unwrap();
    let stock = load(&dense_out);
    assert!(!stock.is_pruned(), "the dense-equivalent folder is a stock checkpoint");
    let got = to_vec(stock.forward(input, None, None));
    let want: Vec<f32> = expected.iter().map(|&b| f32::from_bits(b)).collect();
    assert!(max_abs_diff(&got, &want) <= 1e-5, "dense-equivalent differs by {}", max_abs_diff(&got, &want));
}

#[test]
fn bad_input_is_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pruned_folder("llama_gqa_tied", tmp.path());
    let text = tmp.path().join("train.txt");
    std::fs::write(&text, "plain training text, long enough for a window or two. ".repeat(3)).unwrap();
    let out = tmp.path().join("out");
    let err = |r: FinetuneRequest| {
        let e = format!("{:#}", disp_train::finetune(&r, &Device::flex(), |_| {}).unwrap_err());
        assert!(!e.contains('\n'), "{e}");
        assert!(!out.exists(), "{e}: output written");
        e
    };
    let base = || request(&dir, text.clone(), out.clone(), ExportFormat::Pruned);
    assert!(err(FinetuneRequest { cfg: FinetuneConfig { rank: 0, ..cfg(2) }, ..base() }).contains("--rank must be at least 1"));
    assert!(err(FinetuneRequest { cfg: FinetuneConfig { rank: 9999, ..cfg(2) }, ..base() }).contains("is larger than the q linear of block 0"));
    assert!(err(FinetuneRequest { cfg: FinetuneConfig { steps: 0, ..cfg(2) }, ..base() }).contains("--steps must be at least 1"));
    assert!(err(FinetuneRequest { eval: vec![text.clone()], ..base() }).contains("is also an evaluation file"));
    let copy = tmp.path().join("copy.txt");
    std::fs::copy(&text, &copy).unwrap();
    assert!(err(FinetuneRequest { eval: vec![copy], ..base() }).contains("is also an evaluation file"), "same contents under another name");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert!(err(FinetuneRequest { data: vec![empty], ..base() }).contains("empty"));
    assert!(err(FinetuneRequest { model_dir: tmp.path().join("dense"), ..base() }).contains("not a pruned folder"));
    assert!(err(FinetuneRequest { cfg: FinetuneConfig { objective: Objective::Kd, ..cfg(2) }, ..base() }).contains("needs --teacher"));
    assert!(err(FinetuneRequest { teacher_dir: Some(dir.clone()), cfg: FinetuneConfig { objective: Objective::Kd, ..cfg(2) }, ..base() })
        .contains("the teacher must be the dense model"));
    // A teacher of another shape.
    let other = tmp.path().join("other");
    pruned_folder("opt_pre_ln", &other);
    let e = err(FinetuneRequest { teacher_dir: Some(other.join("dense")), cfg: FinetuneConfig { objective: Objective::Kd, ..cfg(2) }, ..base() });
    assert!(e.contains("the teacher is opt"), "{e}");
    // A teacher with another tokenizer.
    let retok = tmp.path().join("retok");
    std::fs::create_dir_all(&retok).unwrap();
    for entry in std::fs::read_dir(tmp.path().join("dense")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), retok.join(entry.file_name())).unwrap();
    }
    let mut tokenizer: serde_json::Value = serde_json::from_slice(&std::fs::read(retok.join("tokenizer.json")).unwrap()).unwrap();
    tokenizer["added_tokens"] = serde_json::json!([]);
    std::fs::write(retok.join("tokenizer.json"), serde_json::to_vec(&tokenizer).unwrap()).unwrap();
    let e = err(FinetuneRequest { teacher_dir: Some(retok), cfg: FinetuneConfig { objective: Objective::Kd, ..cfg(2) }, ..base() });
    assert!(e.contains("tokenizer.json differs"), "{e}");
}
