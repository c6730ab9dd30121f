//! The `metamix` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use metamix::recipe::Recipe;
use metamix::run::Run;
use metamix::sample::{SampleOptions, generate};
use metamix::train::{EVAL_SEED_SALT, Ranks, TrainOptions, evaluate, train};

/// mimalloc keeps freed pages for reuse where glibc returns large blocks to the kernel and
/// faults them in again on the next op (see scripts/bench_cpu.py).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` (its place in mimalloc's option enum, v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed memory back to the OS: Burn allocates a fresh buffer per op, and each
/// page returned after mimalloc's default 10 ms is faulted in and zeroed by the kernel again
/// (18% of a nanoGPT-model step in `clear_page_erms`; ~1 k page faults per bench instead of
/// ~90 k). A training process's footprint is its peak anyway.
fn keep_freed_memory() {
    // SAFETY: sets an integer option; mimalloc reads it on each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[derive(Parser)]
#[command(
    name = "metamix",
    version,
    about = "Train efficient MetaFormer transformers from a TOML recipe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Recipe overrides on the command line; the shorthands win over `--set`.
#[derive(Args, Clone, Default)]
struct Overrides {
    /// Override a recipe key, e.g. --set optimizer.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// training.backend: cpu, wgpu or libtorch.
    #[arg(long)]
    backend: Option<String>,
    /// training.precision: f32, bf16 or f16.
    #[arg(long)]
    precision: Option<String>,
    /// training.device: default, cpu or a GPU index.
    #[arg(long)]
    device: Option<String>,
}

impl Overrides {
    fn list(&self) -> Vec<String> {
        let mut all = self.set.clone();
        let quoted = |key: &str, v: &Option<String>| {
            v.as_ref().map(|v| match v.parse::<usize>() {
                Ok(k) => format!("training.{key}={k}"),
                Err(_) => format!("training.{key}=\"{v}\""),
            })
        };
        all.extend(quoted("backend", &self.backend));
        all.extend(quoted("precision", &self.precision));
        all.extend(quoted("device", &self.device));
        all
    }
}

/// `metamix prepare`'s flags: the options of [`metamix::data::prepare`].
#[derive(Args)]
struct PrepareArgs {
    /// Files, folders (searched recursively) or globs: .txt and .md (a document per
    /// file), .jsonl (a document per line), each optionally .gz or .zst.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// char, byte, gpt2, bpe:N (trains a byte-level BPE of N tokens on the training
    /// split) or a Hugging Face tokenizer.json.
    #[arg(long)]
    tokenizer: String,
    /// The folder to write (refused if it already holds a dataset, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// The JSONL field with each document's text.
    #[arg(long, default_value = "text")]
    text_field: String,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Fixes which documents are held out.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: u64,
    /// Replace a prepared dataset in --out.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    quiet: bool,
}

impl PrepareArgs {
    fn options(&self) -> anyhow::Result<metamix::data::PrepareOptions> {
        Ok(metamix::data::PrepareOptions {
            tokenizer: self
                .tokenizer
                .parse()
                .map_err(|e| anyhow::anyhow!("--tokenizer: {e}"))?,
            out: Some(self.out.clone()),
            text_field: self.text_field.clone(),
            val_fraction: self.val_fraction,
            seed: self.seed,
            shard_tokens: self.shard_tokens,
            force: self.force,
            quiet: self.quiet,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train the model a recipe describes (checkpoints and logs go to runs/<name>).
    Train {
        recipe: PathBuf,
        /// Continue from the newest intact checkpoint of the run.
        #[arg(long)]
        resume: bool,
        /// Start from the weights of an export folder (metamix or --format hf; its
        /// config.json must describe the recipe's model), a Hugging Face GPT-2/Llama folder,
        /// or a safetensors file.
        #[arg(long, value_name = "PATH")]
        init_from: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Tokenise a corpus into memory-mapped token shards plus meta.json and tokenizer.json:
    /// the folder a recipe's `data.path` names. Documents go to train or val by a seeded
    /// hash of their text (one text file alone: its last --val-fraction is val).
    Prepare(PrepareArgs),
    /// Write a checkpoint as an export folder: model.safetensors (PyTorch layout),
    /// config.json, tokenizer.json and a README.md model card.
    Export {
        run: PathBuf,
        /// The folder to write (e.g. exports/shakespeare_char).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A checkpoint step (default: the newest intact one).
        #[arg(long)]
        step: Option<u64>,
        /// metamix (its own config.json, for python/metamix_torch.py) or hf (a
        /// transformers GPT2LMHeadModel / LlamaForCausalLM folder).
        #[arg(long, value_enum, default_value = "metamix")]
        format: metamix::export::Format,
        /// Validation batches measured for the model card (0: none).
        #[arg(long, value_name = "N")]
        eval_batches: Option<usize>,
        /// Replace an earlier export folder.
        #[arg(long)]
        force: bool,
    },
    /// Generate text from a run's checkpoint.
    Sample {
        run: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 200)]
        top_k: usize,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        #[arg(long)]
        step: Option<u64>,
    },
    /// Training throughput of a recipe's model (no checkpoints, no eval).
    Bench {
        recipe: PathBuf,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Host this machine's CPU device for ranks of a parallel run elsewhere: list
    /// "ws://<this host>:<port>" in `parallelism.devices` (build with --features remote).
    /// Runs until Ctrl+C / SIGTERM, then prints the process's peak memory.
    Serve {
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
    /// Forward(+backward) time of one token mixer alone (the recipe's first layer's) on a
    /// random `[batch, seq_len, d_model]` input. Peak memory: measure the process (see
    /// scripts/sweep_seq_len.py).
    BenchMixer {
        recipe: PathBuf,
        #[arg(long)]
        seq_len: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Forward only, without autodiff (what inference costs).
        #[arg(long)]
        forward_only: bool,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Validation loss and perplexity of a run's checkpoint; for a task run, loss and
    /// accuracy over its whole validation set.
    Eval {
        run: PathBuf,
        #[arg(long)]
        step: Option<u64>,
        /// Batches to average (default: the recipe's training.eval_batches; a task run
        /// scores every validation example unless this is given).
        #[arg(long)]
        batches: Option<usize>,
        /// Score the task with other `[task]` settings, e.g. --set task.seq_len=512 to test
        /// length generalisation (the model's own keys cannot change).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List the registered token mixers: recipe name, how it runs under sequence
    /// parallelism, and its options with their defaults (`[model.<name>]`), one JSON object
    /// per line. Scripts iterate this list.
    Mixers,
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // A server computes for its clients on its network threads and blocks this one: on the
    // pool, it would only take a pool thread from them.
    let result = if matches!(cli.command, Command::Serve { .. }) {
        run(cli)
    } else {
        metamix::device::on_compute_threads(|| run(cli))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train {
            recipe,
            resume,
            init_from,
            overrides,
            quiet,
        } => {
            let recipe = Recipe::load(&recipe, &overrides.list())?;
            metamix::components::stop_signal::install();
            let s = train(
                &recipe,
                &TrainOptions {
                    resume,
                    init_from,
                    stop_after: None,
                    quiet,
                },
            )?;
            println!(
                "done: step {} | train loss {:.4} | val loss {} | {} | {:.0} tokens/s | {:.1} s | {}",
                s.step,
                s.train_loss,
                s.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                match s.val_accuracy {
                    Some(a) => format!("val accuracy {:.2}%", 100.0 * a),
                    None => format!(
                        "val bits/byte {}",
                        s.val_bits_per_byte
                            .map_or("-".into(), |v| format!("{v:.4}"))
                    ),
                },
                s.tokens_per_s,
                s.wall_s,
                s.run_dir.display()
            );
        }
        Command::Prepare(args) => {
            let p = metamix::data::prepare(&args.inputs, &args.options()?)?;
            let out = &args.out;
            let m = &p.meta;
            let skipped = &m.skipped_documents;
            println!(
                "prepared {} into train {} + val {} tokens ({} {} shards, vocabulary {}) | \
                 {:.1} MB/s | {:.1} s | {}",
                if m.split_rule == "tail" {
                    "1 document (its last val_fraction validates)".to_string()
                } else {
                    format!(
                        "{} documents (train {}, val {})",
                        m.documents.train + m.documents.val,
                        m.documents.train,
                        m.documents.val
                    )
                },
                m.tokens.train,
                m.tokens.val,
                m.shards.len(),
                serde_json::to_value(m.dtype)?.as_str().unwrap_or("?"),
                m.vocab_size,
                p.bytes_read as f64 / 1e6 / p.seconds,
                p.seconds,
                out.display()
            );
            if skipped.total() > 0 {
                println!(
                    "skipped {} documents: {} not UTF-8, {} empty, {} without a string \
                     --text-field (the first at {})",
                    skipped.total(),
                    skipped.invalid_utf8,
                    skipped.empty,
                    skipped.no_text_field,
                    skipped.first.as_deref().unwrap_or("?")
                );
            }
        }
        Command::Export {
            run,
            out,
            step,
            format,
            eval_batches,
            force,
        } => {
            let run = Run::open(&run)?;
            let r = &run.recipe;
            let batches = eval_batches.unwrap_or(r.training.eval_batches);
            // The card's numbers are `metamix eval`'s, when the run's data is still there.
            let measure = |model: &metamix::model::LanguageModel| {
                let data = run.dataset().ok().filter(|_| batches > 0)?;
                data.check_seq_len(r.training.seq_len, &r.data.path).ok()?;
                let device = burn::prelude::Device::flex();
                let e = evaluate(
                    model,
                    &data.val,
                    batches,
                    r.micro_batch_size(),
                    r.training.seq_len,
                    r.training.seed ^ EVAL_SEED_SALT,
                    &Ranks::single(device),
                );
                Some(metamix::export::CardMetrics {
                    val_loss: e.loss,
                    bits_per_byte: e.bits_per_byte,
                    batches,
                })
            };
            let files = metamix::export::export(&run, step, &out, format, force, &measure)?;
            println!("wrote {}: {}", out.display(), files.join(", "));
        }
        Command::Sample {
            run,
            prompt,
            tokens,
            temperature,
            top_k,
            seed,
            step,
        } => {
            if !(temperature.is_finite() && temperature >= 0.0) {
                anyhow::bail!(
                    "--temperature {temperature}: must be a finite number >= 0 (0 = greedy; 0.8 is usual)"
                );
            }
            let run = Run::open(&run)?;
            let tokenizer = run.text_tokenizer("sample")?;
            let device = Ranks::from_recipe(&run.recipe)?.device(0).clone();
            let _busy = metamix::device::BusyPool::for_devices([&device]);
            let (model, _) = run.load_model(step, &device)?;
            let text = generate(
                &model,
                tokenizer,
                &prompt,
                &SampleOptions {
                    max_new_tokens: tokens,
                    temperature,
                    top_k,
                    seed,
                },
                &device,
            )?;
            println!("{text}");
        }
        Command::Bench {
            recipe,
            warmup,
            steps,
            overrides,
        } => {
            let recipe = Recipe::load(&recipe, &overrides.list())?;
            let r = metamix::train::bench::bench(&recipe, warmup, steps)?;
            println!(
                "bench {}: {} parameters | {} tokens/step | {:.1} ms/step | {:.0} tokens/s ({} timed steps after {warmup} warm-up)",
                recipe.name,
                r.parameters,
                r.tokens_per_step,
                r.seconds_per_step * 1e3,
                r.tokens_per_s,
                r.steps
            );
            if let Some(cores) = r.cpu_cores {
                // Spinning pool threads count as busy to the OS: say how much of it was that.
                println!(
                    "CPU in the timed steps: {cores:.2} cores busy, {:.2} of them waiting for work",
                    r.waiting_cores
                );
            }
            if r.rank_peak_bytes.iter().any(Option::is_some) {
                let mib: Vec<String> = r
                    .rank_peak_bytes
                    .iter()
                    .map(|b| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0)))
                    .collect();
                println!("peak memory per rank (MiB): {}", mib.join(" | "));
            }
        }
        Command::BenchMixer {
            recipe,
            seq_len,
            batch,
            warmup,
            iters,
            forward_only,
            overrides,
        } => {
            let recipe = Recipe::load(&recipe, &overrides)?;
            let r = metamix::train::bench::bench_mixer(
                &recipe,
                batch,
                seq_len,
                warmup,
                iters,
                forward_only,
            )?;
            println!(
                "bench-mixer {} seq_len {seq_len} batch {batch}: {:.2} ms per {}",
                recipe.layer_mixers()[0].name(),
                r.seconds_per_iter * 1e3,
                if forward_only {
                    "forward"
                } else {
                    "forward+backward"
                }
            );
        }
        Command::Serve { port } => serve(port)?,
        Command::Mixers => {
            let defaults = metamix::mixers::MixerOptionsSet::default();
            for &kind in metamix::mixers::MixerKind::ALL {
                let line = serde_json::json!({
                    "name": kind.name(),
                    "sequence_parallel": kind.sharded_form().name(),
                    "options": defaults.to_json(kind),
                });
                println!("{line}");
            }
        }
        Command::Eval {
            run,
            step,
            batches,
            set,
        } => {
            let run = Run::open(&run)?;
            let r = &run.recipe;
            let device = Ranks::from_recipe(r)?.device(0).clone();
            let _busy = metamix::device::BusyPool::for_devices([&device]);
            let (model, ckpt) = run.load_model(step, &device)?;
            if batches == Some(0) {
                anyhow::bail!("--batches must be at least 1");
            }
            if r.task.kind != metamix::tasks::TaskKind::Lm {
                return eval_task(&run, &model, ckpt.step, batches, &set, device);
            }
            if !set.is_empty() {
                anyhow::bail!(
                    "--set applies to task runs ([task] settings such as task.seq_len); {} is a \
                     language model run",
                    run.dir.display()
                );
            }
            let batches = batches.unwrap_or(r.training.eval_batches);
            let data = run.dataset()?;
            data.check_seq_len(r.training.seq_len, &r.data.path)?;
            let eval = evaluate(
                &model,
                &data.val,
                batches,
                r.micro_batch_size(),
                r.training.seq_len,
                r.training.seed ^ EVAL_SEED_SALT,
                &Ranks::single(device.clone()),
            );
            println!(
                "step {}: val loss {:.4} | perplexity {:.3} | bits/byte {}",
                ckpt.step,
                eval.loss,
                eval.loss.exp(),
                eval.bits_per_byte.map_or("-".into(), |b| format!("{b:.4}"))
            );
        }
    }
    Ok(())
}

/// `metamix eval` of a task run: loss and accuracy on the validation set of the run's task,
/// with `overrides` applied to its `[task]` (the model stays as trained).
fn eval_task(
    run: &Run,
    model: &metamix::model::LanguageModel,
    step: u64,
    batches: Option<usize>,
    overrides: &[String],
    device: burn::prelude::Device,
) -> anyhow::Result<()> {
    use metamix::tasks::TaskData;
    if let Some(key) = overrides
        .iter()
        .find(|o| !o.trim_start().starts_with("task."))
    {
        anyhow::bail!(
            "--set {key}: eval scores a trained model, so only [task] keys (task.seq_len, \
             task.mqar.num_kv_pairs, ...) can change"
        );
    }
    let recipe_file = run.dir.join(metamix::run::RECIPE_FILE);
    let r = Recipe::load(&recipe_file, overrides)?;
    let seq_len = r.seq_len();
    if let Some(max) = model.max_seq_len()
        && seq_len > max
    {
        anyhow::bail!(
            "task.seq_len = {seq_len} is longer than the {max} positions this model has (a \
             learned position table or RoPE table sized at training): evaluate at most {max}, \
             or train with model.position = \"none\" and model.max_seq_len >= {seq_len}"
        );
    }
    let data = TaskData::open(&r.task, seq_len, r.training.seed, false)?;
    let micro = r.micro_batch_size();
    let e = metamix::train::evaluate_task(
        model,
        &data,
        micro,
        batches.map(|b| b * micro),
        None,
        &Ranks::single(device),
    );
    println!(
        "step {step}: task {} at seq_len {seq_len}: val loss {:.4} | accuracy {:.2}% ({} examples)",
        r.task.kind.name(),
        e.loss,
        100.0 * e.accuracy,
        e.examples
    );
    Ok(())
}

#[cfg(feature = "remote")]
fn serve(port: u16) -> anyhow::Result<()> {
    use burn::prelude::Device;
    use burn::server::{RemoteServer, WebSocketTransport};
    eprintln!("serving the CPU device on ws://0.0.0.0:{port} (Ctrl+C to stop)");
    install_serve_reporting();
    RemoteServer::new([Device::flex()])
        .serve(WebSocketTransport::new(port))
        .map_err(|e| anyhow::anyhow!("serve on port {port}: {e:?}"))?;
    // The rank's memory high-water mark, for benchmarks (Linux).
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM"))
    {
        println!("peak memory: {}", line.trim_start_matches("VmHWM:").trim());
    }
    Ok(())
}

/// What `serve` prints. Logs: `RUST_LOG`'s filter, or by default burn-remote's own (info,
/// wgpu at warn) without its line per tensor transfer between ranks (`external_comm`:
/// hundreds a step, which bury the sessions and warnings); burn-remote installs its
/// subscriber only where none is. Panics: see below.
#[cfg(feature = "remote")]
fn install_serve_reporting() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,wgpu=warn,burn_communication::external_comm=warn")
    });
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    // A rank that stops (Ctrl+C, or its run ending) drops the connections other servers
    // opened to it without a closing handshake; the tasks serving them, and the sessions
    // that needed them, panic on their own threads while the server goes on: one line
    // each, not a backtrace, unless RUST_BACKTRACE asks for it.
    let default_hook = std::panic::take_hook();
    let details = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    std::panic::set_hook(Box::new(move |info| {
        let on_main = std::thread::current().name() == Some("main");
        match (details || on_main, info.payload_as_str()) {
            (false, Some(message)) => eprintln!(
                "serve: a session or connection ended: {message} (still serving; \
                 RUST_BACKTRACE=1 shows where)"
            ),
            _ => default_hook(info),
        }
    }));
}

#[cfg(not(feature = "remote"))]
fn serve(_port: u16) -> anyhow::Result<()> {
    anyhow::bail!(
        "serve: this metamix was built without remote devices; rebuild with `cargo build --release --features remote`"
    )
}
