//! Training tiny models of every family from scratch: the loss falls, runs are reproducible
//! from the seed, and the written folder loads back to the same model.

use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_models::{Family, RawConfig};
use disp_train::pretrain::{hf_config, ModelSize, PretrainConfig, Pretrainer};

/// A few KB of text (Austen, public domain), one token per byte.
const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first entering \
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the \
rightful property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one day, \
have you heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, returned she; \
for Mrs. Long has just been here, and she told me all about it. Mr. Bennet made no answer. Do you not want to know \
who has taken it? cried his wife impatiently. You want to tell me, and I have no objection to hearing it. ";

const SEQ: usize = 32;

fn windows() -> Vec<Vec<u32>> {
    let bytes: Vec<u32> = TEXT.repeat(4).bytes().map(u32::from).collect();
    bytes.chunks_exact(SEQ).map(<[u32]>::to_vec).collect()
}

fn raw_config(family: Family) -> RawConfig {
    let kv_heads = if family == Family::Llama { 2 } else { 4 };
    let size = ModelSize { hidden: 32, layers: 2, heads: 4, kv_heads, intermediate: 64, vocab: 256, max_positions: 64 };
    RawConfig { path: format!("<tiny {family:?} config>").into(), json: hf_config(family, &size, 0).unwrap() }
}

fn settings() -> PretrainConfig {
    PretrainConfig { steps: 30, batch_size: 8, learning_rate: 1e-2, warmup_steps: 3, seed: 7, ..Default::default() }
}

/// Losses of every step and the final parameter values (as bits).
fn run(family: Family) -> (Vec<f64>, Vec<Vec<u32>>, Pretrainer) {
    let mut trainer = Pretrainer::new(raw_config(family), windows(), &settings(), &Device::flex()).unwrap();
    let losses = (0..settings().steps).map(|_| trainer.step().unwrap().loss).collect();
    let bits = trainer.tensors().into_iter().map(|(_, _, v)| v.iter().map(|x| x.to_bits()).collect()).collect();
    (losses, bits, trainer)
}

fn logits(model: &dyn disp_models::CausalLm) -> Vec<u32> {
    let ids: Vec<i64> = TEXT.bytes().take(2 * SEQ).map(i64::from).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, SEQ]), model.device());
    let values = model.forward(tokens, None, None).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    values.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_family_learns_reproducibly_and_reloads_identically() {
    for family in [Family::Llama, Family::Opt, Family::Phi] {
        let (losses, params, trainer) = run(family);
        let first = losses[0];
        let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
        println!("{family:?}: loss {first:.3} -> {last:.3} (mean of the last 5 steps)");
        // At initialisation the loss is about ln(256) = 5.55.
        assert!((first - 256f64.ln()).abs() < 0.3, "{family:?}: first loss {first}");
        assert!(last < first - 1.0, "{family:?}: loss went from {first} to {last}");

        let (again, params_again, _) = run(family);
        assert_eq!(losses, again, "{family:?}: losses differ between runs with the same seed");
        assert!(params == params_again, "{family:?}: final parameters differ between runs with the same seed");

        let dir = tempfile::tempdir().unwrap();
        trainer.write_hf_files(dir.path(), &trainer.raw_config().json).unwrap();
        let reloaded = disp_models::load_model(dir.path(), &Device::flex()).unwrap();
        let in_memory = trainer.model().unwrap();
        assert!(logits(reloaded.as_ref()) == logits(in_memory.as_ref()), "{family:?}: the written model computes something else");
    }
}

#[test]
fn another_seed_gives_another_run() {
    let mut a = Pretrainer::new(raw_config(Family::Llama), windows(), &settings(), &Device::flex()).unwrap();
    let other = PretrainConfig { seed: 8, ..settings() };
    let mut b = Pretrainer::new(raw_config(Family::Llama), windows(), &other, &Device::flex()).unwrap();
    assert_ne!(a.step().unwrap().loss, b.step().unwrap().loss);
}

#[test]
fn windows_outside_the_vocabulary_are_refused() {
    let mut bad = windows();
    bad[3][5] = 300;
    let err = Pretrainer::new(raw_config(Family::Phi), bad, &settings(), &Device::flex()).err().unwrap();
    assert!(err.to_string().contains("window 3 holds token 300"), "{err}");
}
