//! The commands that inspect rather than run: `replay` (recorded decisions
//! through the current plugins), `call` (one stage on JSON cases) and
//! `check` (rule and plugin files).

use super::*;

pub(crate) async fn replay(
    config: GanglionConfig,
    log: PathBuf,
    export: Option<PathBuf>,
) -> Result<()> {
    let records = ganglion::audit::read(&log).map_err(anyhow::Error::msg)?;
    if let Some(out) = export {
        let n = ganglion::audit::export_finetune(&records, &out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("{n} prompt/completion pairs written to {}", out.display());
        return Ok(());
    }
    let local = ganglion::llm::load_configured(&config.model).await;
    let engines =
        ganglion::llm::Engines::build(local, &config.remote, config.model.engine.as_deref())
            .map_err(anyhow::Error::msg)?;
    let llm = engines.default_engine().clone();
    let now = match &config.model.path {
        Some(p) => ganglion::audit::file_hash(p).await,
        None => None,
    };
    let recorded: std::collections::BTreeSet<Option<&str>> =
        records.iter().map(|r| r.model.hash.as_deref()).collect();
    if recorded.iter().any(|h| h.is_some() && *h != now.as_deref()) {
        println!(
            "note: decisions were recorded with another model file than {} now",
            config
                .model
                .path
                .as_deref()
                .map_or("(none)".into(), |p| p.display().to_string())
        );
    }
    // A scratch state store: replaying never changes the gateway's state.
    let host = PluginHost::new(config.plugins.clone(), StateStore::in_memory(), llm.clone())?;
    let (pipelines, problems) =
        ganglion::reload::Reloader::new(host, &config.plugins.dir, &config.rules.dir, llm)
            .with_extra_rule_dirs(&config.rules.extra_dirs)
            .with_engines(engines)
            .load_all()
            .await;
    for p in &problems {
        tracing::warn!("{p}");
    }
    let results = ganglion::replay::replay(&records, &pipelines).await;
    let changed: Vec<_> = results.iter().filter(|c| !c.changed.is_empty()).collect();
    for c in &changed {
        println!(
            "decision {} ({} / {}): changed {}",
            c.index + 1,
            c.rule,
            c.device,
            c.changed.join(", ")
        );
    }
    println!(
        "{} decisions replayed, {} changed",
        results.len(),
        changed.len()
    );
    Ok(())
}

pub(crate) async fn call(
    config: GanglionConfig,
    file: PathBuf,
    cases: PathBuf,
    settings: String,
    stage: Option<String>,
    model: bool,
) -> Result<()> {
    use ganglion::devtools::harness;
    let settings: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&settings).context("--settings must be a JSON object")?;
    let text = if cases.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&cases).with_context(|| format!("reading {}", cases.display()))?
    };
    let llm: Arc<dyn ganglion::llm::LlmEngine> = if model {
        ganglion::llm::load_configured(&config.model).await
    } else {
        Arc::new(NoModel)
    };
    let host = PluginHost::new(config.plugins, StateStore::in_memory(), llm)?;
    let plugin = host.load_file(&file).await?;
    let stage = harness::stage_to_call(&plugin.stages, stage.as_deref())?;
    let pool = host.pool(&plugin, "call", settings);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", cases.display(), n + 1))?;
        let outcome = harness::run_case(&pool, stage, &case)
            .await
            .with_context(|| format!("{} line {}", cases.display(), n + 1))?;
        println!("{outcome}");
    }
    Ok(())
}

pub(crate) async fn check(config: GanglionConfig, files: Vec<PathBuf>) -> Result<()> {
    let limits = config.plugins.limits.clone();
    let host = PluginHost::new(config.plugins, StateStore::in_memory(), Arc::new(NoModel))?;
    let mut failed = 0;
    for file in files {
        match host.load_file(&file).await {
            Ok(p) => {
                let stages: Vec<&str> = p.stages.iter().map(|s| s.name()).collect();
                println!("{}: ok", file.display());
                println!("  name      {}", p.name);
                println!("  version   {}", p.version);
                println!("  stages    {}", stages.join(", "));
                println!("  imports   {}", p.imports.join(", "));
                println!("  size      {} bytes", p.size);
                println!("  load      {:?} ({:?})", p.load_time, p.compiled);
                println!(
                    "  limits    instantiates within {} ms and {} MiB",
                    limits.call_timeout_ms, limits.max_memory_mib
                );
            }
            Err(e) => {
                failed += 1;
                println!("{}: REFUSED\n  {e}", file.display());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} file(s) refused");
    }
    Ok(())
}
