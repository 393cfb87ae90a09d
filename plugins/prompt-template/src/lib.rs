//! Prompt template: renders the rule's minijinja templates over the window.
//!
//! Template variables: `rule`, `device`, `window_start` and `window_end`
//! (epoch ms), `readings` (list of `{device, metric, value, unit, timestamp}`),
//! and `metrics` (per metric: `count`, `last`, `min`, `max`, `mean`, `unit`,
//! `values`; numbers only).
//!
//! ```toml
//! [template]
//! plugin = "prompt-template"
//! config.system = "You watch industrial machines. Answer with JSON actions."
//! config.user = "{{ device }}: temperature last {{ metrics.temperature.last }}, max {{ metrics.temperature.max }}"
//! config.max_tokens = 96
//! config.json_schema = '{"type":"object"}'
//! ```

use ganglion_sdk::{
    Constraint, Context, GenerationParams, PluginError, Prompt, PromptTemplate, ReadingBatch,
    Value, config,
};
use minijinja::Environment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub system: String,
    pub user: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    pub deadline_ms: Option<u32>,
    /// A JSON Schema, as JSON text or as a table.
    pub json_schema: Option<serde_json::Value>,
    pub choices: Option<Vec<String>>,
    pub regex: Option<String>,
}

pub struct Renderer {
    env: Environment<'static>,
    params: GenerationParams,
}

#[derive(Serialize)]
struct ReadingView<'a> {
    device: &'a str,
    metric: &'a str,
    value: serde_json::Value,
    unit: &'a str,
    timestamp: i64,
}

#[derive(Serialize, Default)]
struct MetricSummary {
    count: usize,
    last: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    mean: Option<f64>,
    unit: String,
    values: Vec<f64>,
}

impl Renderer {
    pub fn new(cfg: Config) -> Result<Self, PluginError> {
        let constraint = match (cfg.json_schema, cfg.choices, cfg.regex) {
            (None, None, None) => Constraint::None,
            (Some(schema), None, None) => Constraint::JsonSchema(match schema {
                serde_json::Value::String(s) => {
                    serde_json::from_str::<serde_json::Value>(&s).map_err(|e| {
                        PluginError::BadConfig(format!("json_schema is not valid JSON: {e}"))
                    })?;
                    s
                }
                other => other.to_string(),
            }),
            (None, Some(choices), None) if !choices.is_empty() => Constraint::Choice(choices),
            (None, None, Some(regex)) => Constraint::Regex(regex),
            _ => {
                return Err(PluginError::BadConfig(
                    "give at most one of json_schema, choices (non-empty), regex".into(),
                ));
            }
        };
        let defaults = GenerationParams::default();
        let params = GenerationParams {
            max_tokens: cfg.max_tokens.unwrap_or(defaults.max_tokens),
            temperature: cfg.temperature.unwrap_or(defaults.temperature),
            top_k: cfg.top_k.unwrap_or(defaults.top_k),
            top_p: cfg.top_p.unwrap_or(defaults.top_p),
            repeat_penalty: cfg.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            seed: cfg.seed,
            stop: cfg.stop,
            deadline_ms: cfg.deadline_ms,
            constraint,
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        env.add_template("system", leak(cfg.system))
            .map_err(|e| PluginError::BadConfig(format!("system template: {e}")))?;
        env.add_template("user", leak(cfg.user))
            .map_err(|e| PluginError::BadConfig(format!("user template: {e}")))?;
        Ok(Renderer { env, params })
    }

    pub fn render(&self, context: &Context, window: &ReadingBatch) -> Result<Prompt, PluginError> {
        let mut metrics: BTreeMap<&str, MetricSummary> = BTreeMap::new();
        let mut readings = Vec::with_capacity(window.len());
        for r in window.iter() {
            let value = match r.value {
                Value::Number(n) => serde_json::json!(n),
                Value::Boolean(b) => serde_json::json!(b),
                Value::Text(t) => serde_json::json!(t),
            };
            let m = metrics.entry(r.metric).or_default();
            m.count += 1;
            if let Some(v) = r.value.as_f64() {
                m.values.push(v);
                m.last = Some(v);
                m.min = Some(m.min.map_or(v, |x| x.min(v)));
                m.max = Some(m.max.map_or(v, |x| x.max(v)));
            }
            if m.unit.is_empty() {
                m.unit = r.unit.to_owned();
            }
            readings.push(ReadingView {
                device: r.device,
                metric: r.metric,
                value,
                unit: r.unit,
                timestamp: r.timestamp,
            });
        }
        for m in metrics.values_mut() {
            if !m.values.is_empty() {
                m.mean = Some(m.values.iter().sum::<f64>() / m.values.len() as f64);
            }
        }
        let ctx = minijinja::context! {
            rule => &context.rule,
            device => &context.device,
            window_start => context.window_start,
            window_end => context.window_end,
            readings => readings,
            metrics => metrics,
        };
        let render = |name: &str| -> Result<String, PluginError> {
            self.env
                .get_template(name)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| PluginError::BadConfig(format!("{name} template: {e}")))
        };
        Ok(Prompt {
            system: render("system")?,
            user: render("user")?,
            params: self.params.clone(),
        })
    }
}

struct Template;

static RENDERER: OnceLock<Result<Renderer, PluginError>> = OnceLock::new();

impl PromptTemplate for Template {
    fn render(context: Context, window: ReadingBatch) -> Result<Prompt, PluginError> {
        let renderer = RENDERER
            .get_or_init(|| config::parse::<Config>().and_then(Renderer::new))
            .as_ref()
            .map_err(Clone::clone)?;
        renderer.render(&context, &window)
    }
}

ganglion_sdk::export!(Template: template);
