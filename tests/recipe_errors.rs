//! A table of broken recipes, each with the message a user gets. Every message must name the
//! file and the key, and say what would be valid.

use metamix::recipe::Recipe;

/// (recipe text, overrides, expected key path, expected fragment of the message)
const CASES: &[(&str, &[&str], &str, &str)] = &[
    // Typos and unknown keys.
    (
        "[training]\nlearning_rate = 1e-3\n",
        &[],
        "training.learning_rate",
        "unknown field `learning_rate`, expected one of",
    ),
    (
        "[modle]\nd_model = 64\n",
        &[],
        "modle",
        "unknown field `modle`, expected one of",
    ),
    (
        "[model]\nmixer = \"sofmax\"\n",
        &[],
        "model.mixer",
        "unknown variant `sofmax`, expected one of `softmax`, `linear`, `ssm`, `pool`",
    ),
    (
        "[model]\nn_layers = 2\nmixers = [\"softmax\", \"attn\"]\n",
        &[],
        "model.mixers[1]",
        "unknown variant `attn`",
    ),
    (
        "[model]\nnorm = \"batchnorm\"\n",
        &[],
        "model.norm",
        "expected `layer_norm` or `rms_norm`",
    ),
    (
        "[model]\nmlp = \"swiglu\"\nactivation = \"relu\"\n",
        &[],
        "model.activation",
        "\"relu\" applies to mlp = \"standard\" only; swiglu's gate is always SiLU",
    ),
    (
        "[model]\nmlp = \"geglu\"\n",
        &[],
        "model.mlp",
        "expected `standard` or `swiglu`",
    ),
    (
        "[model]\nactivation = \"tanh\"\n",
        &[],
        "model.activation",
        "expected one of `gelu`, `gelu_tanh`, `relu`, `silu`, `squared_relu`",
    ),
    (
        "[training]\nbackend = \"cuda\"\n",
        &[],
        "training.backend",
        "expected one of `cpu`, `wgpu`, `libtorch`",
    ),
    (
        "[lr_scheduler]\ndecay = \"exp\"\n",
        &[],
        "lr_scheduler.decay",
        "expected one of `cosine`, `linear`, `constant`",
    ),
    // Mixer options.
    (
        "[model.linear]\nfeature_map = \"softplus\"\n",
        &[],
        "model.linear.feature_map",
        "expected one of `elu_plus_one`, `relu`, `identity`",
    ),
    (
        "[model.ssm]\nd_stat = 8\n",
        &[],
        "model.ssm.d_stat",
        "unknown field `d_stat`, expected one of `d_state`",
    ),
    (
        "[model]\nmixer = \"pool\"\n[model.pool]\ncausal = false\n",
        &[],
        "model.pool.causal",
        "sees future positions",
    ),
    (
        "[model.ssm]\ndt_min = 0.5\n",
        &[],
        "model.ssm.dt_min",
        "must be in (0, dt_max = 0.1]",
    ),
    (
        "[model]\nn_heads = 4\n[model.softmax]\nn_kv_heads = 3\n",
        &[],
        "model.softmax.n_kv_heads",
        "3 does not divide n_heads = 4: use a divisor of 4 (e.g. 1, 2, 4)",
    ),
    (
        "[model]\nmixer = \"moh\"\n[model.moh.attention]\nn_kv_heads = 3\n",
        &[],
        "model.moh.attention.n_kv_heads",
        "3 does not divide n_heads = 4",
    ),
    (
        "[model]\nmixer = \"mamba2\"\n[model.mamba2]\nheaddim = 48\n",
        &[],
        "model.mamba2.headdim",
        "headdim 48 does not divide d_inner = expand · d_model = 256",
    ),
    (
        "[model.mamba2]\nheaddm = 8\n",
        &[],
        "model.mamba2.headdm",
        "unknown field `headdm`, expected one of `d_state`",
    ),
    (
        "[model]\nmixer = \"mamba3\"\n",
        &[],
        "model.mixer",
        "unknown variant `mamba3`, expected one of `softmax`, `linear`, `ssm`, `pool`, `moh`, `mamba2`",
    ),
    (
        "[model]\nsoftmax = 5\n",
        &[],
        "model.softmax",
        "invalid type: integer `5`",
    ),
    // Wrong types.
    (
        "[training]\nsteps = \"many\"\n",
        &[],
        "training.steps",
        "invalid type: string \"many\", expected u64",
    ),
    (
        "[model]\nd_model = 12.5\n",
        &[],
        "model.d_model",
        "invalid type: floating point `12.5`, expected usize",
    ),
    (
        "[metrics]\ntensorboard = \"yes\"\n",
        &[],
        "metrics.tensorboard",
        "expected a boolean",
    ),
    (
        "[training]\nsteps = -5\n",
        &[],
        "training.steps",
        "invalid value: integer `-5`, expected u64",
    ),
    // Impossible values.
    (
        "[model]\nd_model = 100\nn_heads = 3\n",
        &[],
        "model.n_heads",
        "3 heads do not divide d_model = 100: pick a divisor of 100 (e.g. 1, 2, 4, 5, 10, 20, ..., 100)",
    ),
    (
        "[model]\nn_layers = 3\nmixers = [\"softmax\"]\n",
        &[],
        "model.mixers",
        "lists 1 mixers for n_layers = 3",
    ),
    (
        "[model]\ndropout = 1.5\n",
        &[],
        "model.dropout",
        "must be in [0, 1)",
    ),
    (
        "[training]\nbatch_size = 12\nmicro_batch_size = 5\n",
        &[],
        "training.micro_batch_size",
        "5 does not divide batch_size = 12",
    ),
    (
        "[training]\nsteps = 0\n",
        &[],
        "training.steps",
        "must be at least 1",
    ),
    (
        "[optimizer]\nlr = 0.0\n",
        &[],
        "optimizer.lr",
        "must be finite and > 0",
    ),
    (
        "[optimizer]\nbeta2 = 1.0\n",
        &[],
        "optimizer.beta2",
        "must be in [0, 1)",
    ),
    (
        "[lr_scheduler]\nmin_lr = 0.1\n",
        &[],
        "lr_scheduler.min_lr",
        "must be in [0, optimizer.lr = 0.001]",
    ),
    (
        "[checkpoint]\nkeep_latest_k = 0\n",
        &[],
        "checkpoint.keep_latest_k",
        "must be at least 1",
    ),
    (
        "[training]\nprecision = \"fp8\"\n",
        &[],
        "training.precision",
        "expected one of `f32`, `bf16`, `f16`",
    ),
    (
        "[training]\ndevice = \"tpu\"\n",
        &[],
        "training.device",
        "unknown device \"tpu\": use \"default\", \"cpu\", a GPU index (0, 1, ...) or a metamix serve address",
    ),
    (
        "[training]\ndevice = 1\n",
        &[],
        "training.device",
        "the cpu backend has one device (got 1)",
    ),
    (
        "[training.loss_scaler]\nbackoff_factor = 1.5\n",
        &[],
        "training.loss_scaler.backoff_factor",
        "must be in (0, 1)",
    ),
    (
        "[parallelism]\nsequence_parallel_degree = 3\n",
        &[],
        "training.seq_len",
        "64 does not split into 6 equal chunks (zigzag sharding over 3 ranks): use a multiple of 6",
    ),
    (
        "[parallelism]\nsequence_parallel_degree = 0\n",
        &[],
        "parallelism.sequence_parallel_degree",
        "must be at least 1",
    ),
    (
        "[parallelism]\ndata_parallel_degree = 5\n",
        &[],
        "parallelism.data_parallel_degree",
        "5 replicas cannot share micro-batches of 12 sequences",
    ),
    (
        "[parallelism]\nsequence_parallel_degree = 2\ndevices = [\"default\"]\n",
        &[],
        "parallelism.devices",
        "1 devices for 2 ranks",
    ),
    (
        "[parallelism]\nsequence_parallel_degree = 4\nsequence_sharding = \"diagonal\"\n",
        &[],
        "parallelism.sequence_sharding",
        "expected `zigzag` or `contiguous`",
    ),
    (
        "[model]\nmixer = \"pool\"\n[model.pool]\npool_size = 12\n[parallelism]\nsequence_parallel_degree = 4\n",
        &[],
        "model.pool.pool_size",
        "use pool_size <= 9",
    ),
    (
        "[data]\npath = 5\n",
        &[],
        "data.path",
        "invalid type: integer `5`, expected path string",
    ),
    (
        "[data]\nval_fraction = 0.0\n",
        &[],
        "data.val_fraction",
        "must be in (0, 1)",
    ),
    // Broken TOML and broken overrides.
    (
        "[model\nd_model = 64\n",
        &[],
        "(toml)",
        "TOML parse error at line 1, column 7 | 1 | [model | ^ unclosed table, expected `]`",
    ),
    (
        "",
        &["training.lr"],
        "--set training.lr",
        "expected KEY=VALUE",
    ),
    (
        "",
        &["training.lr=3e-4"],
        "training.lr",
        "unknown field `lr`",
    ),
    (
        "[model]\nd_model = 64\n",
        &["model.d_model.x=1"],
        "--set model.d_model.x=1",
        "d_model is a value, not a section",
    ),
    (
        "",
        &["model.n_layers=two"],
        "model.n_layers",
        "invalid type: string \"two\", expected usize",
    ),
];

#[test]
fn every_broken_recipe_names_file_key_and_remedy() {
    assert!(CASES.len() >= 15);
    let mut failures = Vec::new();
    for (i, (text, overrides, key, fragment)) in CASES.iter().enumerate() {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        match Recipe::from_toml_str(text, "recipes/broken.toml", "broken", &overrides) {
            Ok(_) => failures.push(format!("case {i}: accepted {text:?}")),
            Err(e) => {
                let msg = e.to_string();
                let ok = e.file == "recipes/broken.toml"
                    && e.key == *key
                    && msg.starts_with(&format!("recipes/broken.toml: {key}: "))
                    && msg.contains(fragment);
                if !ok {
                    failures.push(format!(
                        "case {i}: expected key {key:?} and {fragment:?}\n   got: {msg}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn missing_recipe_file_is_named() {
    let e = Recipe::load(std::path::Path::new("recipes/nope.toml"), &[]).unwrap_err();
    assert_eq!(e.file, "recipes/nope.toml");
    assert!(e.to_string().contains("cannot read the recipe"), "{e}");
}

#[test]
fn shipped_recipes_are_valid() {
    for entry in std::fs::read_dir("recipes").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
