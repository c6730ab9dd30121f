//! The `README.md` of an export folder: what the model is, how it was trained, how well it
//! did, and how to load it.

use super::{CardMetrics, Format};
use crate::model::LanguageModelConfig;
use crate::run::{RECIPE_FILE, Run};

pub struct Card<'a> {
    pub name: &'a str,
    /// Where the folder was written, as the user named it (for the load commands).
    pub path: &'a str,
    pub run: &'a Run,
    pub config: &'a LanguageModelConfig,
    pub step: u64,
    pub format: Format,
    /// The `transformers` class of an hf export.
    pub hf_class: Option<&'static str>,
    pub metrics: Option<CardMetrics>,
    pub parameters: usize,
}

pub fn render(card: &Card) -> String {
    let c = card.config;
    let m = &c.model;
    let r = &card.run.recipe;
    let mut mixers: Vec<String> = Vec::new();
    for k in &c.mixers {
        if !mixers.contains(&k.name().to_string()) {
            mixers.push(k.name().to_string());
        }
    }
    let results = match &card.metrics {
        Some(x) => format!(
            "Validation loss **{:.4}** nats/token{} — {} batches of {}×{} tokens from the run's \
             validation split (`metamix eval`).",
            x.val_loss,
            x.bits_per_byte
                .map(|b| format!(", **{b:.4}** bits/byte"))
                .unwrap_or_default(),
            x.batches,
            r.micro_batch_size(),
            r.training.seq_len
        ),
        None => "Not measured: the run's data was not found when it was exported.".to_string(),
    };
    let load = match card.format {
        Format::Metamix => format!(
            "```sh\n\
             # PyTorch, with metamix's one-file model (python/metamix_torch.py in the metamix repository)\n\
             python3 python/metamix_torch.py {name} --prompt \"ROMEO:\" --max-new-tokens 200\n\
             # metamix: start a new run from these weights (the recipe must describe this model)\n\
             metamix train recipe.toml --init-from {name}\n\
             ```\n\n\
             ```python\n\
             from metamix_torch import load\n\
             model, tokenizer = load(\"{name}\")   # torch.nn.Module, tokenizers.Tokenizer\n\
             ```\n\n\
             `config.json` states every field that changes the computation (under the recipe's \
             key names) and, under `conventions`, the rules a reimplementation must follow.\n",
            name = card.path
        ),
        Format::Hf => format!(
            "```python\n\
             from transformers import AutoModelForCausalLM, AutoTokenizer\n\
             model = AutoModelForCausalLM.from_pretrained(\"{name}\")   # {class}\n\
             tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n\
             ```\n\n\
             Back into metamix: `metamix train recipe.toml --init-from {name}`.\n",
            name = card.path,
            class = card.hf_class.unwrap_or("?")
        ),
    };
    let recipe =
        std::fs::read_to_string(card.run.dir.join(RECIPE_FILE)).unwrap_or_else(|_| r.to_toml());
    format!(
        "# {name}\n\n\
         A {layers}-layer MetaFormer language model ({mixers} token mixing; d_model {d}, {heads} \
         heads, {params:.2} M parameters, vocabulary {vocab}, {tokenizer} tokenizer) trained with \
         metamix for {step} steps{format}.\n\n\
         ## Results\n\n{results}\n\n\
         ## Loading\n\n{load}\n\
         ## Recipe\n\n\
         The run's resolved recipe (`{run}`):\n\n```toml\n{recipe}```\n",
        name = card.name,
        layers = m.n_layers,
        mixers = mixers.join(" + "),
        d = m.d_model,
        heads = m.n_heads,
        params = card.parameters as f64 / 1e6,
        vocab = c.vocab_size,
        tokenizer = r.data.tokenizer.as_deref().unwrap_or("?"),
        step = card.step,
        format = card
            .hf_class
            .map(|cl| format!(", exported as `transformers`' {cl}"))
            .unwrap_or_default(),
        run = card.run.dir.display(),
    )
}
