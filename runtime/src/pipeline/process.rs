//! A message through the rule's stages: parse, preprocess, window, prompt,
//! model, postprocess, allow-list; or the handler and the allow-list. Every
//! failure becomes a dead letter naming the message it came from.

use super::*;

impl RulePipeline {
    /// Processes one message to the end of the pipeline (or into a window).
    pub async fn process(&self, message: &Message) -> Outcome {
        let mut readings = match self.intake(message) {
            Ok(r) => r,
            Err(outcome) => return *outcome,
        };
        match &self.bindings {
            Bindings::Handler(h) => match h.pool.handle(&self.rule.name, message).await {
                Ok(actions) => {
                    let device = self
                        .rule
                        .topic_device(&message.topic, self.limits.max_device_bytes)
                        .unwrap_or_default();
                    tracing::Span::current().record("device", device);
                    self.authorize(message.into(), device, actions, h)
                }
                Err(e) => self.call_failed(message.into(), "handler", h, e),
            },
            Bindings::Chain { preprocess, .. } => {
                let started = Instant::now();
                for p in preprocess {
                    readings = match p.pool.preprocess(message, readings).await {
                        Ok(r) => r,
                        Err(e) => return self.call_failed(message.into(), "preprocess", p, e),
                    };
                }
                let mut outcome = Outcome {
                    readings: readings.len(),
                    ..Outcome::default()
                };
                if !preprocess.is_empty() {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    outcome.stage_ms.push(("preprocess", ms));
                }
                let mut bad_devices = 0usize;
                let mut crowded: Vec<(String, usize)> = Vec::new();
                let topic_device = self
                    .rule
                    .device_level
                    .map(|i| message.topic.split('/').nth(i).unwrap_or_default());
                let mut spoofed = 0;
                let by_device = split_by_device(readings);
                // The gateway's span for this message has a `device` field:
                // filled when the message's readings are of one device
                // (the usual case), left empty when of several.
                if let [(device, _)] = by_device.as_slice() {
                    tracing::Span::current().record("device", device.as_str());
                }
                for (device, batch) in by_device {
                    if let Some(own) = topic_device
                        && device != own
                    {
                        if spoofed == 0 {
                            let why = format!(
                                "readings of device `{}` on a topic of device `{own}` (`device_level = {}`)",
                                device.escape_debug(),
                                self.rule.device_level.unwrap_or_default()
                            );
                            outcome.dead_letters.push(self.dead(
                                message,
                                "window",
                                "device-mismatch",
                                why,
                                None,
                            ));
                        }
                        spoofed += 1;
                        continue;
                    }
                    if let Err(why) = check_device(&device, self.limits.max_device_bytes) {
                        if bad_devices == 0 {
                            outcome.dead_letters.push(self.dead(
                                message,
                                "window",
                                "bad-device",
                                why,
                                None,
                            ));
                        }
                        bad_devices += 1;
                        continue;
                    }
                    let ready = match self.window_spec() {
                        None => Some(batch),
                        Some(spec) => match self.add_to_window(&device, batch, message, spec) {
                            Ok((ready, commit)) => {
                                outcome.persisted = outcome.persisted.max(commit);
                                ready
                            }
                            Err(n) => {
                                crowded.push((device, n));
                                continue;
                            }
                        },
                    };
                    if let Some(window) = ready {
                        outcome.merge(self.run_window(message.into(), &device, window).await);
                    }
                }
                if bad_devices > 1
                    && let Some(dl) = outcome
                        .dead_letters
                        .iter_mut()
                        .find(|d| d.kind == "bad-device")
                {
                    dl.reason = format!(
                        "{} (and {} more refused device ids in this message)",
                        dl.reason,
                        bad_devices - 1
                    );
                }
                if !crowded.is_empty() {
                    let readings: usize = crowded.iter().map(|(_, n)| n).sum();
                    let reason = format!(
                        "{readings} readings of {} new devices (first `{}`) refused: the rule already has {} open windows (`[rules.limits] max_windows`)",
                        crowded.len(),
                        crowded[0].0,
                        self.limits.max_windows
                    );
                    outcome.dead_letters.push(self.dead(
                        message,
                        "window",
                        "too-many-windows",
                        reason,
                        None,
                    ));
                }
                outcome
            }
        }
    }

    /// The payload cap and the format check (CSV parsed into readings): a
    /// dead letter when the message is refused.
    pub(super) fn intake(&self, message: &Message) -> Result<ReadingBatch, Box<Outcome>> {
        if message.payload.len() > self.rule.max_payload_bytes {
            let reason = format!(
                "payload of {} bytes over the rule's cap of {}",
                message.payload.len(),
                self.rule.max_payload_bytes
            );
            return Err(Box::new(Outcome {
                dead_letters: vec![self.dead(message, "intake", "oversized-payload", reason, None)],
                ..Outcome::default()
            }));
        }
        let mut readings = ReadingBatch::default();
        match self.rule.format {
            PayloadFormat::Json => {
                if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&message.payload) {
                    return Err(Box::new(Outcome {
                        dead_letters: vec![self.dead(
                            message,
                            "intake",
                            "bad-payload",
                            format!("invalid JSON: {e}"),
                            None,
                        )],
                        ..Outcome::default()
                    }));
                }
            }
            PayloadFormat::Csv => match parse_csv(
                message,
                self.rule
                    .csv
                    .as_ref()
                    .expect("validated: csv rules have [csv]"),
            ) {
                Ok(b) => readings = b,
                Err(reason) => {
                    return Err(Box::new(Outcome {
                        dead_letters: vec![self.dead(
                            message,
                            "intake",
                            "bad-payload",
                            reason,
                            None,
                        )],
                        ..Outcome::default()
                    }));
                }
            },
            PayloadFormat::Raw => {}
        }
        Ok(readings)
    }

    /// The context of a device's window: its readings' time span, or the
    /// message's time when they carry none.
    pub(super) fn window_context(
        &self,
        device: &str,
        window: &ReadingBatch,
        received: i64,
    ) -> Context {
        Context {
            rule: self.rule.name.clone(),
            device: device.to_owned(),
            window_start: window
                .readings
                .iter()
                .map(|r| r.timestamp)
                .min()
                .unwrap_or(received),
            window_end: window
                .readings
                .iter()
                .map(|r| r.timestamp)
                .max()
                .unwrap_or(received),
        }
    }

    pub(super) async fn run_window(
        &self,
        message: Source<'_>,
        device: &str,
        window: ReadingBatch,
    ) -> Outcome {
        let Bindings::Chain {
            prompt,
            postprocess,
            ..
        } = &self.bindings
        else {
            // Only a window an earlier version of the rule left open gets
            // here: a handler rule has no stage to take readings.
            let reason = format!(
                "the rule was changed to a handler rule; {} readings of device `{device}` waiting in its window have no stage to go to",
                window.len()
            );
            return Outcome {
                dead_letters: vec![self.dead(message, "window", "rule-changed", reason, None)],
                ..Outcome::default()
            };
        };
        let context = self.window_context(device, &window, message.timestamp());
        let auditing = self.audit.as_ref().filter(|_| prompt.is_some());
        let recorded_window = auditing.map(|_| crate::audit::record_window(&window));
        let d = self.decide(&context, window).await;
        if let (Some(log), Some(window)) = (auditing, recorded_window) {
            log.append(&self.record(&context, window, &d, log));
        }
        let mut outcome = Outcome::default();
        if prompt.is_some() {
            outcome.stage_ms.push(("template", d.timings.prompt_ms));
        }
        if d.completion.is_some() {
            outcome.stage_ms.push(("llm", d.timings.llm_ms));
        }
        // Postprocess ran unless the template failed or the model did.
        let ran_postprocess = d.failure.as_ref().is_none_or(|(s, _)| *s != "template")
            && d.completion.as_ref().is_none_or(Result::is_ok);
        if ran_postprocess {
            outcome
                .stage_ms
                .push(("postprocess", d.timings.postprocess_ms));
        }
        if let Some(p) = &d.prompt {
            outcome.prompts.push(p.user.clone());
        }
        match &d.completion {
            Some(Ok(c)) => outcome.completions.push(c.text.clone()),
            Some(Err(e)) => {
                let kind = match e {
                    LlmError::DeadlineExceeded => "llm-deadline",
                    _ => "llm-error",
                };
                outcome
                    .dead_letters
                    .push(self.dead(message, "llm", kind, e.to_string(), None));
            }
            None => {}
        }
        if let Some((stage, e)) = d.failure {
            let bound = match stage {
                "template" => prompt.as_ref().unwrap_or(postprocess),
                _ => postprocess,
            };
            outcome.merge(self.call_failed(message, stage, bound, e));
        }
        outcome.merge(self.deliverable(message, d.actions, postprocess));
        outcome
    }

    /// The window's way through prompt, model, postprocess and allow-list.
    pub(super) async fn decide(&self, context: &Context, window: ReadingBatch) -> Decision {
        let mut d = Decision::default();
        let Bindings::Chain {
            prompt,
            postprocess,
            ..
        } = &self.bindings
        else {
            return d;
        };
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
        let completion = match prompt {
            None => None,
            Some(p) => {
                let t = Instant::now();
                let rendered = p.pool.render(context, window.clone()).await;
                d.timings.prompt_ms = ms(t);
                let mut rendered = match rendered {
                    Ok(r) => r,
                    Err(e) => {
                        d.failure = Some(("template", e));
                        return d;
                    }
                };
                if self.rule.allow.constrain_model {
                    let schema = self.rule.allow.action_schema(
                        &self.rule.name,
                        &context.device,
                        MODEL_ACTIONS,
                    );
                    rendered.params.constraint =
                        crate::types::Constraint::JsonSchema(schema.to_string());
                }
                d.prompt = Some(rendered.clone());
                let t = Instant::now();
                let c = self.generate(rendered).await;
                d.timings.llm_ms = ms(t);
                let ok = c.as_ref().ok().cloned();
                d.completion = Some(c);
                match ok {
                    Some(c) => Some(c),
                    None => return d,
                }
            }
        };
        let t = Instant::now();
        let result = postprocess
            .pool
            .postprocess(context, window, completion.as_ref())
            .await;
        d.timings.postprocess_ms = ms(t);
        match result {
            Ok(actions) => {
                d.actions = actions
                    .iter()
                    .map(|a| self.rule.authorize(a, &context.device))
                    .collect();
            }
            Err(e) => d.failure = Some(("postprocess", e)),
        }
        d
    }

    /// The audit record of a decision.
    pub(super) fn record(
        &self,
        context: &Context,
        window: Vec<crate::audit::RecordedReading>,
        d: &Decision,
        log: &AuditLog,
    ) -> DecisionRecord {
        use crate::audit::{RecordedModel, RecordedPlugin};
        let plugin = |b: Option<&Bound>| RecordedPlugin {
            name: b.map(|b| b.plugin().name.clone()).unwrap_or_default(),
            version: b
                .map(|b| b.plugin().version.to_string())
                .unwrap_or_default(),
        };
        let (prompt_bound, post_bound) = match &self.bindings {
            Bindings::Chain {
                prompt,
                postprocess,
                ..
            } => (prompt.as_ref(), Some(postprocess)),
            Bindings::Handler(_) => (None, None),
        };
        let replayed = d.replayed();
        DecisionRecord {
            v: 1,
            timestamp: now_ms(),
            rule: self.rule.name.clone(),
            device: context.device.clone(),
            window_start: context.window_start,
            window_end: context.window_end,
            window,
            prompt_plugin: plugin(prompt_bound),
            postprocess_plugin: plugin(post_bound),
            model: RecordedModel {
                id: self.llm.model_id(),
                hash: log.model_hash(),
            },
            prompt: replayed.prompt.unwrap_or_else(|_| {
                crate::audit::record_prompt(&crate::types::Prompt {
                    system: String::new(),
                    user: String::new(),
                    params: Default::default(),
                })
            }),
            completion: replayed.completion.unwrap_or_else(|| {
                crate::audit::record_completion(&Err(LlmError::InvalidInput(
                    "no model call".into(),
                )))
            }),
            actions: replayed.actions,
            error: replayed.error,
            timings: d.timings,
        }
    }

    /// Takes a recorded decision again through this rule's current prompt
    /// plugin, the current model and the current postprocess plugin (for
    /// `ganglion replay`).
    pub async fn replay(&self, record: &DecisionRecord) -> Replayed {
        let has_prompt = matches!(
            &self.bindings,
            Bindings::Chain {
                prompt: Some(_),
                ..
            }
        );
        if !has_prompt {
            return Replayed {
                prompt: Err(format!("rule `{}` has no prompt stage now", self.rule.name)),
                completion: None,
                actions: Vec::new(),
                error: None,
            };
        }
        self.decide(&record.context(), record.window_batch())
            .await
            .replayed()
    }

    /// Asks the engine; `overloaded` waits and retries within the timeout,
    /// which holds the message (backpressure) instead of dropping it.
    pub(super) async fn generate(
        &self,
        prompt: crate::types::Prompt,
    ) -> Result<Completion, LlmError> {
        let request = GenerateRequest::system_and_user(
            prompt.system,
            prompt.user,
            prompt.params,
            self.rule.name.clone(),
        );
        let limit = request.params.deadline_ms.map_or(self.llm_timeout, |ms| {
            self.llm_timeout.min(Duration::from_millis(u64::from(ms)))
        });
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.llm.generate(request.clone())).await {
                Err(_) => return Err(LlmError::DeadlineExceeded),
                Ok(Err(LlmError::Overloaded)) if started.elapsed() + backoff < limit => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Ok(r) => return r,
            }
        }
    }

    pub(super) fn authorize(
        &self,
        message: Source<'_>,
        device: &str,
        actions: Vec<Action>,
        by: &Bound,
    ) -> Outcome {
        let checked = actions
            .iter()
            .map(|a| self.rule.authorize(a, device))
            .collect();
        self.deliverable(message, checked, by)
    }

    /// Actions the allow-list let out, to publish; refused ones, dead-lettered
    /// with the reason and the plugin that proposed them.
    pub(super) fn deliverable(
        &self,
        message: Source<'_>,
        checked: Vec<Result<Outgoing, String>>,
        by: &Bound,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        for a in checked {
            match a {
                Ok(out) => outcome.publish.push(out),
                Err(reason) => outcome.dead_letters.push(self.dead(
                    message,
                    "allow-list",
                    "refused-action",
                    reason,
                    Some(by.plugin()),
                )),
            }
        }
        outcome
    }

    pub(super) fn dead<'a>(
        &self,
        source: impl Into<Source<'a>>,
        stage: &str,
        kind: &str,
        reason: String,
        plugin: Option<&Plugin>,
    ) -> DeadLetter {
        let origin;
        let o = match source.into() {
            Source::Window(o) => o,
            Source::Message(m) => {
                origin = Origin::of(m, self.limits.dead_letter_payload_bytes);
                &origin
            }
        };
        DeadLetter {
            rule: self.rule.name.clone(),
            plugin: plugin.map(|p| p.name.clone()),
            version: plugin.map(|p| p.version.to_string()),
            stage: stage.into(),
            kind: kind.into(),
            reason,
            topic: o.topic.clone(),
            payload: o.prefix.clone(),
            payload_bytes: o.bytes,
            payload_blake3: o.blake3.clone(),
            timestamp: o.timestamp,
        }
    }

    /// A dead letter of this rule about `message`, no plugin at fault (for
    /// the gateway: a lane that panicked).
    pub fn dead_letter(
        &self,
        message: &Message,
        stage: &str,
        kind: &str,
        reason: String,
    ) -> DeadLetter {
        self.dead(message, stage, kind, reason, None)
    }

    /// A dead letter of this rule about an output that could not be
    /// published (`kind` `oversized-output` or `publish-refused`): the
    /// output's topic and a prefix of its payload.
    pub fn output_dead_letter(&self, out: &Outgoing, kind: &str, reason: String) -> DeadLetter {
        let origin = Origin::new(
            &out.topic,
            &out.payload,
            now_ms(),
            self.limits.dead_letter_payload_bytes,
        );
        self.dead(&origin, "publish", kind, reason, None)
    }

    pub(super) fn call_failed(
        &self,
        message: Source<'_>,
        stage: &str,
        bound: &Bound,
        e: CallError,
    ) -> Outcome {
        let kind = match &e {
            CallError::Plugin(crate::types::PluginError::BadPayload(_)) => "bad-payload",
            CallError::Plugin(crate::types::PluginError::BadCompletion(_)) => "invalid-completion",
            other => other.kind(),
        };
        Outcome {
            dead_letters: vec![self.dead(
                message,
                stage,
                kind,
                e.to_string(),
                Some(bound.plugin()),
            )],
            ..Outcome::default()
        }
    }
}
