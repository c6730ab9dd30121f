//! An export is a folder that rebuilds the model elsewhere: PyTorch names and shapes, a
//! config.json that states what this model computes, `--init-from` back, a numpy and a
//! PyTorch reimplementation (scripts/check_export.py, python/metamix_torch.py) that
//! reproduce metamix's outputs and greedy decoding, and `--format hf` folders that
//! `transformers` loads and metamix reads back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use common::{quiet, tensors, tiny_recipe};
use metamix::export::{Format, export, init_from};
use metamix::run::Run;
use metamix::sample::{SampleOptions, generate_ids};
use metamix::train::train;
use serde_json::Value;

fn trained(dir: &Path, overrides: &[&str]) -> Run {
    let mut all = vec!["training.steps=2", "training.eval_interval=0"];
    all.extend_from_slice(overrides);
    let recipe = tiny_recipe(dir, &all);
    train(&recipe, &quiet()).unwrap();
    Run::open(&recipe.run_dir()).unwrap()
}

fn export_tiny(dir: &Path, overrides: &[&str], format: Format) -> (Run, PathBuf) {
    let run = trained(dir, overrides);
    let out = dir.join("export");
    export(&run, None, &out, format, false, &|_| None).unwrap();
    (run, out)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn export_writes_a_folder_with_pytorch_names_and_a_complete_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, out) = export_tiny(tmp.path(), &[], Format::Metamix);
    let t = tensors(&out.join("model.safetensors"));
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
    assert_eq!(shape("layers.0.norm1.bias"), vec![32]);
    assert_eq!(shape("position_embedding.weight"), vec![16, 32]);
    assert!(t.iter().all(|x| x.1 == "F32"));
    assert!(
        !t.iter()
            .any(|x| x.0.contains("Softmax") || x.0.contains("gamma"))
    );

    let config = read_json(&out.join("config.json"));
    let m = &config["model"];
    assert_eq!(config["architecture"], "metamix.MetaFormerLM");
    assert_eq!(m["n_layers"], 2);
    assert_eq!(m["mixers"], serde_json::json!(["softmax", "softmax"]));
    assert_eq!(m["vocab_size"], shape("token_embedding.weight")[0]);
    assert_eq!(
        m["softmax"]["n_kv_heads"], 2,
        "0 = n_heads is stated resolved"
    );
    // Only what changes the computation: no training-only keys, no unused mixer.
    for gone in ["dropout", "init_std", "mixer", "linear", "ssm"] {
        assert!(m.get(gone).is_none(), "{gone} in {m}");
    }
    assert!(m["softmax"].get("tiled").is_none() && m["softmax"].get("block_size").is_none());
    assert_eq!(config["derived"]["context"], 16);
    assert!(
        config["conventions"]["decoding"]
            .as_str()
            .unwrap()
            .contains("last 8 tokens")
    );
    // The tokenizer travels with the weights, as a Hugging Face tokenizer.json.
    assert_eq!(config["tokenizer"], "char");
    let tok = metamix::data::Tokenizer::load(&out.join("tokenizer.json"), "char").unwrap();
    assert_eq!(tok.vocab_size(), shape("token_embedding.weight")[0]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("for 2 steps") && card.contains("[model]"),
        "{card}"
    );
}

#[test]
fn init_from_an_export_folder_gives_the_same_model_and_refuses_another() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, out) = export_tiny(
        tmp.path(),
        &[
            "model.tie_embeddings=false",
            "model.layer_scale_init=0.1",
            "model.mlp=\"swiglu\"",
        ],
        Format::Metamix,
    );
    let device = Device::flex();
    let (trained, _) = run.load_model(None, &device).unwrap();
    let config = run.model_config();
    // A fresh model (another seed) loaded from the folder equals the trained one; so does one
    // loaded from the weights file alone.
    let tokens =
        Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2, 7, 3], [1, 6]), &device);
    let want = trained.forward(tokens.clone()).into_data();
    for path in [out.clone(), out.join("model.safetensors")] {
        let loaded = init_from(config.init_seeded(99, &device), &config, &path).unwrap();
        assert_eq!(loaded.forward(tokens.clone()).into_data(), want);
    }

    let err = |c: &metamix::model::LanguageModelConfig, path: &Path| {
        format!(
            "{:#}",
            init_from(c.init_seeded(1, &device), c, path).unwrap_err()
        )
    };
    // Another model's config is refused by key, even where every shape would fit.
    let mut other = config.clone();
    other.model.mixer_options.softmax.rope_theta = 500.0;
    other.model.mixer_options.softmax.rotary = true;
    let e = err(&other, &out);
    assert!(
        e.contains("model.softmax.rotary: false there, true here"),
        "{e}"
    );
    let mut other = config.clone();
    other.model.d_model = 16;
    assert!(err(&other, &out).contains("model.d_model: 32 there, 16 here"));
    // A folder missing its weights is named.
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    let e = err(&config, &out);
    assert!(e.contains("missing model.safetensors"), "{e}");
}

/// The Python interpreter for the PyTorch checks: $METAMIX_TORCH_PYTHON, the venv that
/// scripts/setup_libtorch.sh makes, or python3.
fn torch_python() -> String {
    if let Some(p) = std::env::var_os("METAMIX_TORCH_PYTHON") {
        return p.to_string_lossy().into();
    }
    let venv = std::env::var("HOME").unwrap_or_default() + "/.cache/metamix/torch/venv/bin/python";
    if Path::new(&venv).is_file() {
        venv
    } else {
        "python3".into()
    }
}

/// Whether `python` imports `modules`; when it cannot and `required_by` is set in the
/// environment (CI sets them), the test fails instead of skipping.
fn python_has(python: &str, modules: &str, required_by: &str) -> bool {
    let ok = Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os(required_by).is_none(),
            "{required_by} is set but {python} cannot import {modules}"
        );
        eprintln!("skipping: {python} cannot import {modules}");
    }
    ok
}

/// Export a tiny model trained with `overrides` in `format`, write metamix's outputs on a
/// fixed sequence and its greedy continuation, and have scripts/check_export.py rebuild
/// them with `implementation`.
fn reproduces(python: &str, implementation: &str, format: Format, overrides: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    // Weights far from GPT-2's 0.02, so that outputs depend strongly on every detail and a
    // wrong convention shows far above the tolerance.
    let mut all = vec!["model.init_std=0.3"];
    all.extend_from_slice(overrides);
    let (run, out) = export_tiny(tmp.path(), &all, format);
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
    // Past the 16-token context (a learned table or RoPE's) for metamix's own format, so
    // the restart rule is exercised; inside it for transformers, which has no such rule.
    let prompt = [5u32, 9, 2, 6];
    let new = if format == Format::Hf { 10 } else { 30 };
    let opts = SampleOptions {
        max_new_tokens: new,
        temperature: 0.0,
        top_k: 0,
        seed: 0,
    };
    let continuation = generate_ids(&model, &prompt, &opts, &device);
    let expected = serde_json::json!({
        "tokens": ids, "layer0": rows(layer0), "logits": rows(logits),
        "greedy": {"prompt": prompt, "continuation": continuation},
    });
    let expected_path = tmp.path().join("expected.json");
    std::fs::write(&expected_path, expected.to_string()).unwrap();
    let output = Command::new(python)
        .args(["scripts/check_export.py", "--impl", implementation])
        .arg(&out)
        .arg(&expected_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{implementation} on {overrides:?}:\n{stdout}");
    assert!(
        output.status.success() && stdout.contains("OK"),
        "{implementation} on {overrides:?}:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every mixer and the option combinations the recipes use: rotary, GQA, window, RMSNorm,
/// layer scale, untied head, SwiGLU, hybrids.
const VARIANTS: &[&[&str]] = &[
    &[],
    &[
        "model.norm=\"rms_norm\"",
        "model.activation=\"silu\"",
        "model.bias=false",
        "model.tie_embeddings=false",
        "model.layer_scale_init=0.5",
    ],
    &[
        "model.mixers=[\"linear\", \"ssm\"]",
        "model.linear.decay=\"gated\"",
        "model.position=\"none\"",
    ],
    &[
        "model.mixers=[\"moh\", \"pool\"]",
        "model.n_heads=4",
        "model.moh.shared_heads=1",
        "model.moh.top_k=2",
    ],
    &[
        "model.mixers=[\"linear\", \"linear\"]",
        "model.linear.decay=\"retnet\"",
        "model.mlp=\"swiglu\"",
    ],
    &[
        "model.mixers=[\"mamba2\", \"softmax\"]",
        "model.mamba2.headdim=16",
        "model.mamba2.ngroups=2",
        "model.mamba2.chunk_size=5",
    ],
    &[
        "model.mixer=\"moh\"",
        "model.n_heads=4",
        "model.moh.attention.n_kv_heads=2",
        "model.moh.attention.rotary=true",
        "model.moh.attention.window=4",
        "model.position=\"none\"",
    ],
    &[
        "model.n_heads=4",
        "model.softmax.n_kv_heads=2",
        "model.softmax.rotary=true",
        "model.softmax.window=5",
        "model.position=\"none\"",
    ],
];

#[test]
fn numpy_reimplementation_reproduces_every_variant() {
    if !python_has("python3", "numpy, safetensors", "METAMIX_REQUIRE_PYTHON") {
        return;
    }
    for v in VARIANTS {
        reproduces("python3", "numpy", Format::Metamix, v);
    }
}

#[test]
fn metamix_torch_reproduces_logits_and_greedy_decoding_of_every_variant() {
    let python = torch_python();
    if !python_has(
        &python,
        "torch, safetensors, numpy",
        "METAMIX_REQUIRE_TORCH",
    ) {
        return;
    }
    for v in VARIANTS {
        reproduces(&python, "torch", Format::Metamix, v);
    }
}

const GPT2: &[&str] = &["model.activation=\"gelu_tanh\""];
const LLAMA: &[&str] = &[
    "model.position=\"none\"",
    "model.softmax.rotary=true",
    "model.softmax.rope_theta=500.0",
    "model.norm=\"rms_norm\"",
    "model.mlp=\"swiglu\"",
    "model.mlp_ratio=2.5",
    "model.n_heads=4",
    "model.softmax.n_kv_heads=2",
    "model.bias=false",
    "model.tie_embeddings=false",
];

#[test]
fn hf_exports_load_in_transformers_with_the_same_logits_and_greedy_decoding() {
    let python = torch_python();
    if !python_has(
        &python,
        "torch, transformers, numpy",
        "METAMIX_REQUIRE_TORCH",
    ) {
        return;
    }
    reproduces(&python, "hf", Format::Hf, GPT2);
    reproduces(&python, "hf", Format::Hf, LLAMA);
}

/// `--format hf` and back through `--init-from` is the same model, for GPT-2 and Llama.
#[test]
fn hf_folders_come_back_through_init_from() {
    for (overrides, class) in [(GPT2, "GPT2LMHeadModel"), (LLAMA, "LlamaForCausalLM")] {
        let tmp = tempfile::tempdir().unwrap();
        let (run, out) = export_tiny(tmp.path(), overrides, Format::Hf);
        let hf = read_json(&out.join("config.json"));
        assert_eq!(hf["architectures"][0], class);
        let device = Device::flex();
        let (trained, _) = run.load_model(None, &device).unwrap();
        let config = run.model_config();
        let loaded = init_from(config.init_seeded(7, &device), &config, &out).unwrap();
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 9, 2, 7, 3], [1, 6]),
            &device,
        );
        assert_eq!(
            loaded.forward(tokens.clone()).into_data(),
            trained.forward(tokens).into_data(),
            "{class}"
        );

        // A field metamix cannot honour, and one that disagrees with the recipe, are named.
        let err = |edit: &dyn Fn(&mut Value)| {
            let mut bad = hf.clone();
            edit(&mut bad);
            std::fs::write(out.join("config.json"), bad.to_string()).unwrap();
            format!(
                "{:#}",
                init_from(config.init_seeded(1, &device), &config, &out).unwrap_err()
            )
        };
        if class == "GPT2LMHeadModel" {
            let e = err(&|c| c["scale_attn_by_inverse_layer_idx"] = true.into());
            assert!(e.contains("scale_attn_by_inverse_layer_idx = true"), "{e}");
            let e = err(&|c| c["n_embd"] = 64.into());
            assert!(
                e.contains("n_embd = 64 needs model.d_model = 64 (this recipe: 32)"),
                "{e}"
            );
        } else {
            let e = err(&|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0})
            });
            assert!(e.contains("rope_scaling"), "{e}");
            let e = err(&|c| c["num_key_value_heads"] = 4.into());
            assert!(e.contains("needs model.softmax.n_kv_heads = 4"), "{e}");
        }
        let e = err(&|c| c["model_type"] = "mistral".into());
        assert!(e.contains("model_type \"mistral\""), "{e}");
    }
}

/// Folders that `transformers` itself saved (random weights, its own layout and tying)
/// load through `--init-from` and give transformers' logits.
#[test]
fn folders_saved_by_transformers_load_through_init_from() {
    let python = torch_python();
    if !python_has(&python, "torch, transformers", "METAMIX_REQUIRE_TORCH") {
        return;
    }
    let script = r#"
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
kind, out = sys.argv[1], sys.argv[2]
if kind == "gpt2":
    model = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=16, n_embd=32, n_layer=2,
        n_head=2, activation_function="gelu_new", initializer_range=0.3, bos_token_id=0,
        eos_token_id=0))
else:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=65, hidden_size=32, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=False, initializer_range=0.3))
model.save_pretrained(out)
with torch.no_grad():
    logits = model.eval()(torch.tensor([[3, 14, 15, 9, 2, 6, 5, 3]])).logits[0]
json.dump(logits.tolist(), open(out + "/logits.json", "w"))
"#;
    for (kind, overrides) in [("gpt2", GPT2), ("llama", LLAMA)] {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join(kind);
        let status = Command::new(&python)
            .args(["-c", script, kind])
            .arg(&folder)
            .status()
            .unwrap();
        assert!(status.success(), "{kind}: the transformers script failed");
        let config = metamix::run::model_config(&tiny_recipe(tmp.path(), overrides), 65);
        let device = Device::flex();
        let model = init_from(config.init_seeded(1, &device), &config, &folder).unwrap();
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(vec![3i64, 14, 15, 9, 2, 6, 5, 3], [1, 8]),
            &device,
        );
        let ours: Vec<f32> = model.forward(tokens).into_data().try_to_vec().unwrap();
        let theirs: Vec<Vec<f32>> =
            serde_json::from_value(read_json(&folder.join("logits.json"))).unwrap();
        let theirs: Vec<f32> = theirs.concat();
        let err = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{kind}: max abs difference {err:.2e}");
        assert!(err < 1e-4, "{kind}: logits differ by {err}");
        if kind == "llama" {
            // θ where this transformers version keeps it, changed: named, not loaded.
            let path = folder.join("config.json");
            let mut c = read_json(&path);
            match c.get_mut("rope_parameters").filter(|p| p.is_object()) {
                Some(p) => p["rope_theta"] = 10000.0.into(),
                None => c["rope_theta"] = 10000.0.into(),
            }
            std::fs::write(&path, c.to_string()).unwrap();
            let e = init_from(config.init_seeded(1, &device), &config, &folder).unwrap_err();
            assert!(
                format!("{e:#}").contains("needs model.softmax.rope_theta = 10000"),
                "{e:#}"
            );
        }
    }
}

/// Models that are not a transformers class are refused, naming what blocks them.
#[test]
fn format_hf_names_the_option_that_does_not_map() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["model.mixers=[\"softmax\", \"ssm\"]"],
            "layer 1 has mixer ssm",
        ),
        (&["model.mixer=\"mamba2\""], "layer 0 has mixer mamba2"),
        (&["model.layer_scale_init=0.1"], "model.layer_scale_init"),
        (&["model.softmax.window=4"], "model.softmax.window"),
        (&["model.norm=\"rms_norm\""], "model.norm"),
        (&["model.softmax.n_kv_heads=1"], "model.softmax.n_kv_heads"),
        (
            &[
                "model.position=\"none\"",
                "model.softmax.rotary=true",
                "model.norm=\"rms_norm\"",
            ],
            "model.mlp",
        ),
    ];
    for (overrides, named) in cases {
        let r = tiny_recipe(tmp.path(), overrides);
        let c = metamix::run::model_config(&r, 65);
        let e = metamix::export::hf::architecture(&c)
            .unwrap_err()
            .to_string();
        assert!(e.contains(named), "{overrides:?}: {e}");
    }
    for ok in [GPT2, LLAMA] {
        let c = metamix::run::model_config(&tiny_recipe(tmp.path(), ok), 65);
        assert!(metamix::export::hf::architecture(&c).is_ok(), "{ok:?}");
    }
}

/// The numpy and PyTorch reimplementations know every registered mixer (a new mixer's
/// export must be reproducible outside metamix too).
#[test]
fn reimplementations_cover_every_registered_mixer() {
    for file in ["scripts/check_export.py", "python/metamix_torch.py"] {
        let script = std::fs::read_to_string(file).unwrap();
        let table = &script[script.find("MIXERS = {").expect("MIXERS table")..];
        let table = &table[..table.find('}').unwrap()];
        for kind in metamix::mixers::MixerKind::ALL {
            assert!(
                table.contains(&format!("\"{}\":", kind.name())),
                "{file} has no {kind} mixer"
            );
        }
    }
}
