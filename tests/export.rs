//! Export writes PyTorch-layout safetensors + config.json that rebuild the model elsewhere:
//! names and shapes are PyTorch's, `--init-from` reads the file back, and a numpy
//! reimplementation (scripts/check_export.py) reproduces a layer's output and the logits.

mod common;

use std::path::Path;
use std::process::Command;

use burn::prelude::*;
use common::{quiet, tensors, tiny_recipe};
use metamix::run::Run;
use metamix::train::train;

fn export_tiny(dir: &Path, overrides: &[&str]) -> (Run, std::path::PathBuf) {
    let mut all = vec!["training.steps=2", "training.eval_interval=0"];
    all.extend_from_slice(overrides);
    let recipe = tiny_recipe(dir, &all);
    train(&recipe, &quiet()).unwrap();
    let run = Run::open(&recipe.run_dir()).unwrap();
    let out = dir.join("export/model.safetensors");
    metamix::export::export(&run, None, &out, false).unwrap();
    (run, out)
}

#[test]
fn export_uses_pytorch_names_and_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, out) = export_tiny(tmp.path(), &[]);
    let t = tensors(&out);
    let shape = |name: &str| {
        t.iter()
            .find(|x| x.0 == name)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in {:?}",
                    t.iter().map(|x| &x.0).collect::<Vec<_>>()
                )
            })
            .2
            .clone()
    };
    assert_eq!(shape("layers.0.mixer.q_proj.weight"), vec![32, 32]);
    assert_eq!(
        shape("layers.1.mlp.fc1.weight"),
        vec![128, 32],
        "Linear is [out, in]"
    );
    assert_eq!(shape("layers.1.mlp.fc2.weight"), vec![32, 128]);
    assert_eq!(shape("layers.0.norm1.weight"), vec![32]);
    assert_eq!(shape("layers.0.norm1.bias"), vec![32]);
    assert_eq!(shape("final_norm.weight"), vec![32]);
    assert_eq!(shape("position_embedding.weight"), vec![16, 32]);
    assert!(t.iter().all(|x| x.1 == "F32"));
    assert!(
        !t.iter()
            .any(|x| x.0.contains("Softmax") || x.0.contains("gamma"))
    );

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_file_name("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["n_layers"], 2);
    assert_eq!(config["mixers"], serde_json::json!(["softmax", "softmax"]));
    assert_eq!(config["vocab_size"], shape("token_embedding.weight")[0]);
    assert_eq!(
        config["vocab"].as_array().unwrap().len(),
        shape("token_embedding.weight")[0]
    );
    // The tokenizer travels with the weights, as a Hugging Face tokenizer.json.
    assert_eq!(config["tokenizer"], "char");
    let tok =
        metamix::data::Tokenizer::load(&out.with_file_name("tokenizer.json"), "char").unwrap();
    assert_eq!(tok.vocab_size(), shape("token_embedding.weight")[0]);
    assert_eq!(tok.decode(&tok.encode("ROMEO:").unwrap()), "ROMEO:");
}

#[test]
fn init_from_an_export_gives_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, out) = export_tiny(
        tmp.path(),
        &["model.tie_embeddings=false", "model.layer_scale_init=0.1"],
    );
    let device = Device::flex();
    let (trained, _) = run.load_model(None, &device).unwrap();
    // A fresh model (another seed) loaded from the export equals the trained one.
    let fresh = run.model_config().init_seeded(99, &device);
    let loaded = metamix::weights::load(fresh, &out).unwrap();
    let tokens =
        Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2, 7, 3], [1, 6]), &device);
    let a = trained.forward(tokens.clone()).into_data();
    let b = loaded.forward(tokens).into_data();
    assert_eq!(a, b);

    // A file for another architecture is refused, naming what does not fit.
    let other = tiny_recipe(&tmp.path().join("other"), &["model.d_model=16"]);
    let model =
        metamix::run::model_config(&other, run.tokenizer.vocab_size()).init_seeded(1, &device);
    let err = metamix::weights::load(model, &out).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
}

fn python_has_deps() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .status()
        .is_ok_and(|s| s.success())
}

fn numpy_reproduces(overrides: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (run, out) = export_tiny(tmp.path(), overrides);
    let device = Device::flex();
    let (model, _) = run.load_model(None, &device).unwrap();
    let ids: Vec<i64> = vec![3, 14, 15, 9, 2, 6, 5, 3, 5, 8, 9, 7];
    let t = ids.len();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, t]), &device);
    let layer0 = model.layers[0].forward(model.embed(tokens.clone()));
    let logits = model.forward(tokens);
    let rows = |x: Tensor<3>| {
        let [_, t, d] = x.dims();
        let v: Vec<f32> = x.into_data().try_to_vec::<f32>().unwrap();
        v.chunks(d).take(t).map(|r| r.to_vec()).collect::<Vec<_>>()
    };
    let expected =
        serde_json::json!({"tokens": ids, "layer0": rows(layer0), "logits": rows(logits)});
    let expected_path = tmp.path().join("expected.json");
    std::fs::write(&expected_path, expected.to_string()).unwrap();
    let output = Command::new("python3")
        .arg("scripts/check_export.py")
        .arg(&out)
        .arg(&expected_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("OK"));
}

#[test]
fn numpy_reimplementation_reproduces_layer_and_logits() {
    if !python_has_deps() {
        assert!(
            std::env::var_os("METAMIX_REQUIRE_PYTHON").is_none(),
            "METAMIX_REQUIRE_PYTHON is set but python3 lacks numpy/safetensors"
        );
        eprintln!(
            "skipping: python3 with numpy and safetensors not found (pip install numpy safetensors)"
        );
        return;
    }
    numpy_reproduces(&[]);
    numpy_reproduces(&[
        "model.norm=\"rms_norm\"",
        "model.activation=\"silu\"",
        "model.bias=false",
        "model.tie_embeddings=false",
        "model.layer_scale_init=0.5",
    ]);
    // Every other mixer, in hybrids (the registry's list is checked below).
    numpy_reproduces(&[
        "model.mixers=[\"linear\", \"ssm\"]",
        "model.linear.decay=\"gated\"",
        "model.position=\"none\"",
    ]);
    numpy_reproduces(&[
        "model.mixers=[\"moh\", \"pool\"]",
        "model.n_heads=4",
        "model.moh.shared_heads=1",
        "model.moh.top_k=2",
    ]);
    numpy_reproduces(&[
        "model.mixers=[\"linear\", \"linear\"]",
        "model.linear.decay=\"retnet\"",
    ]);
    numpy_reproduces(&[
        "model.mixers=[\"mamba2\", \"softmax\"]",
        "model.mamba2.headdim=16",
        "model.mamba2.ngroups=2",
        "model.mamba2.chunk_size=5",
    ]);
    // MoH's heads with grouped-query rotary attention in a window.
    numpy_reproduces(&[
        "model.mixer=\"moh\"",
        "model.n_heads=4",
        "model.moh.attention.n_kv_heads=2",
        "model.moh.attention.rotary=true",
        "model.moh.attention.window=4",
        "model.position=\"none\"",
    ]);
    // Grouped-query attention with rotary positions and a sliding window.
    numpy_reproduces(&[
        "model.n_heads=4",
        "model.softmax.n_kv_heads=2",
        "model.softmax.rotary=true",
        "model.softmax.window=5",
        "model.position=\"none\"",
    ]);
}

/// The numpy reimplementation knows every registered mixer (a new mixer's export must be
/// reproducible outside metamix too).
#[test]
fn numpy_reimplementation_covers_every_registered_mixer() {
    let script = std::fs::read_to_string("scripts/check_export.py").unwrap();
    let table = &script[script.find("MIXERS = {").expect("MIXERS table")..];
    let table = &table[..table.find('}').unwrap()];
    for kind in metamix::mixers::MixerKind::ALL {
        assert!(
            table.contains(&format!("\"{}\":", kind.name())),
            "scripts/check_export.py has no {kind} mixer"
        );
    }
}
