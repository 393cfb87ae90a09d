//! Batching: the batched forward pass, the prefix cache, and concurrent
//! requests against the same requests alone.

use super::*;

/// The batched forward pass gives each sequence the logits it gets alone.
#[test]
fn batched_forward_matches_single_sequences() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let mut gguf = gguf::GgufFile::open(&path).unwrap();
    let model = model::Model::load(&mut gguf, &candle_core::Device::Cpu, |_, _| {}).unwrap();
    let prompts: [&[u32]; 3] = [
        &[5, 6, 7, 8, 9],
        &[40, 41],
        &[100, 101, 102, 103, 104, 105, 106],
    ];
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = model::KvCache::default();
            let mut steps = [model::Step {
                tokens: p,
                cache: &mut cache,
            }];
            let l = model.forward(&mut steps).unwrap();
            let mut steps = [model::Step {
                tokens: &[3],
                cache: &mut cache,
            }];
            assert_eq!(l.dims(), [1, model.config.vocab]);
            model
                .forward(&mut steps)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let mut caches: Vec<model::KvCache> = prompts.iter().map(|_| Default::default()).collect();
    let mut steps: Vec<model::Step> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| model::Step {
            tokens: p,
            cache: c,
        })
        .collect();
    model.forward(&mut steps).unwrap();
    let mut steps: Vec<model::Step> = caches
        .iter_mut()
        .map(|c| model::Step {
            tokens: &[3],
            cache: c,
        })
        .collect();
    let batched = model.forward(&mut steps).unwrap().to_vec2::<f32>().unwrap();
    for (a, b) in alone.iter().zip(&batched) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "batched logits differ by {diff}");
    }
    assert_eq!(caches[0].len(), 6);
    assert_eq!(caches[2].len(), 8);
}

fn chat_with_system(system: &str, user: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest::system_and_user(system, user, greedy(max_tokens), "test")
}

#[tokio::test]
async fn a_prefix_cache_hit_gives_the_same_tokens_as_a_miss() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let load = |mib: usize| {
        let config = EngineConfig {
            path: Some(path.clone()),
            prefix_cache_mib: mib,
            ..Default::default()
        };
        Engine::load_with_progress(&config, false).unwrap().0
    };
    let (cached, plain) = (load(64), load(0));
    let system = "You watch the machines of a factory floor: presses, lathes and ovens. \
                  Answer with one JSON action for the device named in the reading.";
    let system_tokens = cached.count_tokens(system).unwrap() as usize;
    let first = cached
        .generate(chat_with_system(system, "press-1 is at 93 C", 16))
        .await
        .unwrap();
    assert_eq!(first.usage.cached_tokens, 0);
    // Prompt tokens the model had to read, over every request of `cached`.
    let mut fed = u64::from(first.usage.prompt_tokens);
    let mut generated = u64::from(first.usage.completion_tokens);
    for user in [
        "lathe-2 is at 40 C",
        "oven-3 door open",
        "press-1 is at 93 C",
    ] {
        let hit = cached
            .generate(chat_with_system(system, user, 16))
            .await
            .unwrap();
        let miss = plain
            .generate(chat_with_system(system, user, 16))
            .await
            .unwrap();
        assert_eq!(miss.usage.cached_tokens, 0);
        assert!(
            hit.usage.cached_tokens as usize >= system_tokens,
            "{user}: {} cached of a {system_tokens}-token system message",
            hit.usage.cached_tokens
        );
        assert!(hit.usage.cached_tokens < hit.usage.prompt_tokens);
        fed += u64::from(hit.usage.prompt_tokens - hit.usage.cached_tokens);
        generated += u64::from(hit.usage.completion_tokens);
        assert_eq!(hit.text, miss.text, "{user}");
        assert_eq!(hit.usage.completion_tokens, miss.usage.completion_tokens);
    }
    // The same prompt again reuses all of it but the last token.
    let again = cached
        .generate(chat_with_system(system, "press-1 is at 93 C", 16))
        .await
        .unwrap();
    assert_eq!(again.usage.cached_tokens + 1, again.usage.prompt_tokens);
    assert_eq!(again.text, first.text);
    fed += 1;
    generated += u64::from(again.usage.completion_tokens);
    // What `/metrics` reports: hits and misses, prefill and decode tokens,
    // one time to first token per request.
    let stats = cached.stats();
    assert_eq!((stats.prefix_hits, stats.prefix_misses), (4, 1));
    assert_eq!(stats.prefill_tokens, fed);
    assert!(
        stats.decode_tokens > 0 && stats.decode_tokens <= generated,
        "{} decode tokens for {generated} generated",
        stats.decode_tokens
    );
    assert_eq!(stats.ttft.iter().sum::<u64>(), 5);
    assert!(stats.ttft_sum_us > 0);
    let plain = plain.stats();
    assert_eq!((plain.prefix_hits, plain.prefix_misses), (0, 3));
}

#[test]
fn the_prefix_cache_stays_within_its_bound() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let mut gguf = gguf::GgufFile::open(&path).unwrap();
    let model = model::Model::load(&mut gguf, &candle_core::Device::Cpu, |_, _| {}).unwrap();
    let prompt = |first: u32| -> Vec<u32> { (first..first + 40).collect() };
    let kv = |ids: &[u32]| {
        let mut cache = model::KvCache::default();
        model
            .forward(&mut [model::Step {
                tokens: ids,
                cache: &mut cache,
            }])
            .unwrap();
        cache
    };
    let one = kv(&prompt(10)).bytes();
    // Room for two and a half prompts.
    let mut prefixes = prefix::PrefixCache::new(one * 5 / 2);
    for first in [10, 60, 110, 160] {
        let ids = prompt(first);
        prefixes.insert(&ids, &kv(&ids));
        assert!(prefixes.bytes() <= one * 5 / 2, "{}", prefixes.bytes());
    }
    assert_eq!(prefixes.len(), 2);
    // The oldest went first: 10.. and 60.. are gone, 110.. and 160.. hit.
    assert_eq!(prefixes.lookup(&prompt(10)).unwrap().0, 0);
    assert_eq!(prefixes.lookup(&prompt(110)).unwrap().0, 39);
    // A partial hit keeps the shared part as an entry of its own, still
    // within the bound (the least recently used full prompt makes room).
    let mut shared = prompt(160)[..20].to_vec();
    shared.extend(500..520);
    let (n, cache) = prefixes.lookup(&shared).unwrap();
    assert_eq!((n, cache.len()), (20, 20));
    assert!(prefixes.bytes() <= one * 5 / 2, "{}", prefixes.bytes());
    let (n, _) = prefixes.lookup(&shared).unwrap();
    assert_eq!(n, 20);
    // Off means nothing is kept.
    let mut off = prefix::PrefixCache::new(0);
    off.insert(&prompt(10), &kv(&prompt(10)));
    assert!(off.is_empty());
}

/// Distinct prompts of up to `words` words (about five tokens each for the
/// tiny tokenizer): most are longer than the small prefill chunk used
/// below, so they are fed in several steps.
fn varied_prompts(n: usize, most: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let words = ["sensor", "valve", "pump", "door", "fan", "boiler", "line"];
            let mut p = format!("{i}:");
            for j in 0..(i * 9 % most) {
                p.push_str(words[(i + j) % words.len()]);
                p.push(' ');
            }
            p
        })
        .collect()
}

fn batching_engine(path: &Path, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = EngineConfig {
        path: Some(path.to_owned()),
        // Hits would take another path through the model than misses.
        prefix_cache_mib: 0,
        prefill_chunk: 16,
        ..Default::default()
    };
    tweak(&mut config);
    Engine::load_with_progress(&config, false).unwrap().0
}

#[tokio::test]
async fn eight_concurrent_greedy_requests_match_running_alone() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            arch: "qwen2",
            dtype: GgmlDType::Q4_1,
            seed: 7,
            ..TinySpec::default()
        },
    ] {
        let dir = tempdir::Dir::new();
        let path = model_file(dir.path(), &spec);
        let engine = batching_engine(&path, |_| {});
        let prompts = varied_prompts(8, 70);
        let mut alone = Vec::new();
        for p in &prompts {
            alone.push(engine.generate(raw(p, greedy(40))).await.unwrap());
        }
        assert_eq!(engine.stats().largest_batch, 1);
        let together = futures_join(
            prompts
                .iter()
                .map(|p| engine.generate(raw(p, greedy(40))))
                .collect(),
        )
        .await;
        let stats = engine.stats();
        // All eight are sent before the first step ends; one that stops
        // early may leave before the last has joined.
        assert!(stats.largest_batch >= 4, "{stats:?}");
        for (i, (a, t)) in alone.iter().zip(together).enumerate() {
            let t = t.unwrap();
            assert_eq!(t.text, a.text, "{} prompt {i}", spec.arch);
            assert_eq!(t.usage, a.usage, "{} prompt {i}", spec.arch);
            assert_eq!(t.finish_reason, a.finish_reason);
        }
        assert_eq!((stats.running, stats.waiting, stats.kv_bytes), (0, 0, 0));
    }
}

#[test]
fn a_sequence_gives_the_same_logits_alone_and_in_a_batch() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let mut gguf = gguf::GgufFile::open(&path).unwrap();
    let model = model::Model::load(&mut gguf, &candle_core::Device::Cpu, |_, _| {}).unwrap();
    let ids: Vec<u32> = (30..62).collect();
    let others: Vec<Vec<u32>> = vec![(100..110).collect(), vec![7], (200..233).collect()];
    let run = |with_others: bool| -> Vec<Vec<f32>> {
        let mut cache = model::KvCache::default();
        let mut other_caches = vec![model::KvCache::default(); others.len()];
        let mut out = Vec::new();
        // A prompt chunk, then decode steps, next to others in other phases.
        for chunk in [&ids[..16], &ids[16..], &[5], &[6], &[7]] {
            let mut steps = vec![model::Step {
                tokens: chunk,
                cache: &mut cache,
            }];
            if with_others {
                for (o, c) in others.iter().zip(other_caches.iter_mut()) {
                    steps.push(model::Step {
                        tokens: if c.is_empty() { o } else { &o[..1] },
                        cache: c,
                    });
                }
            }
            let logits = model.forward(&mut steps).unwrap().to_vec2::<f32>().unwrap();
            out.push(logits[0].clone());
        }
        out
    };
    // Bit for bit: every kernel computes a row from that row alone.
    assert_eq!(run(false), run(true));
}

#[tokio::test]
async fn thirty_two_concurrent_requests_with_deadlines_stay_within_the_kv_bound() {
    let dir = tempdir::Dir::new();
    // 4 KiB of KV state per token: 256 tokens fill the 1 MiB bound.
    let spec = TinySpec {
        width: 128,
        layers: 4,
        heads: 4,
        kv_heads: 4,
        ..TinySpec::default()
    };
    let per_token = 4 * 2 * 4 * 32 * 4;
    let path = model_file(dir.path(), &spec);
    let engine = batching_engine(&path, |c| {
        c.max_batch = 32;
        c.queue = 24;
        c.kv_cache_mib = 1;
    });
    let prompts = varied_prompts(32, 12);
    let requests: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            engine.generate(raw(
                p,
                GenerationParams {
                    // 20 to 100 tokens reserved each: 2 to 12 fit in 1 MiB.
                    max_tokens: 20 + (i as u32 % 3) * 10,
                    deadline_ms: Some([5, 60, 400, 10_000][i % 4]),
                    ..Default::default()
                },
            ))
        })
        .collect();
    let results = futures_join(requests).await;
    let stats = engine.stats();
    let bound = 1 << 20;
    assert_eq!(stats.kv_bound_bytes, bound);
    assert!(stats.kv_peak_bytes <= bound, "{stats:?}");
    assert!(stats.kv_peak_bytes > bound / 4, "{stats:?}");
    assert!(
        stats.largest_batch >= 2 && stats.largest_batch <= bound / (20 * per_token),
        "{stats:?}"
    );
    let (mut ok, mut late, mut refused) = (0, 0, 0);
    for r in &results {
        match r {
            Ok(c) if c.finish_reason == FinishReason::Deadline => late += 1,
            Ok(_) => ok += 1,
            Err(LlmError::DeadlineExceeded) => late += 1,
            Err(LlmError::Overloaded) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok + late + refused, 32);
    assert!(ok > 0 && late > 0 && refused > 0, "{ok} {late} {refused}");
    assert_eq!((stats.running, stats.waiting, stats.kv_bytes), (0, 0, 0));
    // A request that could not fit even alone is refused outright.
    let huge = engine
        .generate(raw(
            "x",
            GenerationParams {
                max_tokens: 400,
                ..Default::default()
            },
        ))
        .await;
    assert!(
        matches!(&huge, Err(LlmError::InvalidInput(m)) if m.contains("kv_cache_mib")),
        "{huge:?}"
    );
}

#[tokio::test]
async fn a_busy_rule_does_not_starve_a_quiet_one() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let engine = batching_engine(&path, |c| c.max_batch = 2);
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let request = |rule: &str, i: usize| {
        let mut r = raw(&format!("{rule} {i}"), greedy(60));
        r.params.temperature = 1.0;
        r.params.seed = Some(i as u64);
        r.rule = rule.into();
        let order = order.clone();
        let rule = rule.to_owned();
        let f = engine.generate(r);
        async move {
            f.await.unwrap();
            order.lock().unwrap().push(rule);
        }
    };
    let mut all: Vec<_> = (0..12).map(|i| tokio::spawn(request("busy", i))).collect();
    all.push(tokio::spawn(request("quiet", 0)));
    for h in all {
        h.await.unwrap();
    }
    let order = order.lock().unwrap();
    let quiet = order.iter().position(|r| r == "quiet").unwrap();
    // Two busy requests hold the batch; the quiet rule gets the next slot.
    assert!(
        quiet <= 3,
        "the quiet rule finished {}th: {order:?}",
        quiet + 1
    );
}

#[tokio::test]
async fn a_caller_that_goes_away_frees_its_place() {
    let dir = tempdir::Dir::new();
    let path = model_file(dir.path(), &TinySpec::default());
    let engine = batching_engine(&path, |c| c.max_batch = 1);
    let full = engine.generate(raw("x", greedy(400))).await.unwrap();
    let n = full.usage.completion_tokens as u64;
    assert!(
        n >= 100,
        "pick a prompt the tiny model runs long on ({n} tokens)"
    );
    let before = engine.stats().steps;
    let handle = tokio::spawn(engine.generate(raw("x", greedy(400))));
    while engine.stats().steps < before + 5 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    handle.abort();
    while engine.stats().running > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let stats = engine.stats();
    assert!(stats.steps - before < n - 10, "{n} tokens, {stats:?}");
}
