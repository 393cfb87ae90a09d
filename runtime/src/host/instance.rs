//! One instantiated component and typed calls into its stage exports.

use super::v0_1_0::bindings::exports::ganglion::plugin::{
    handler, postprocess, preprocess, template,
};
use super::v0_1_0::convert;
use super::{BindingCtx, CallError, HostState, TICK};
use crate::types::{Action, Completion, Context, Message, Prompt, ReadingBatch, Stage};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::InstancePre;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

/// The export lookups of a component, done once per plugin version.
pub struct Exports {
    pre: InstancePre<HostState>,
    preprocess: Option<preprocess::GuestIndices>,
    template: Option<template::GuestIndices>,
    postprocess: Option<postprocess::GuestIndices>,
    handler: Option<handler::GuestIndices>,
}

impl Exports {
    /// Looks up the stage exports of a pre-instantiated component; a stage
    /// it does not export is left out.
    pub fn new(pre: InstancePre<HostState>) -> Self {
        Exports {
            preprocess: preprocess::GuestIndices::new(&pre).ok(),
            template: template::GuestIndices::new(&pre).ok(),
            postprocess: postprocess::GuestIndices::new(&pre).ok(),
            handler: handler::GuestIndices::new(&pre).ok(),
            pre,
        }
    }

    /// The stages whose interface the component exports (types are checked
    /// when an instance is made).
    pub fn stages(&self) -> Vec<Stage> {
        let mut s = Vec::new();
        if self.preprocess.is_some() {
            s.push(Stage::Preprocessor);
        }
        if self.template.is_some() {
            s.push(Stage::PromptTemplate);
        }
        if self.postprocess.is_some() {
            s.push(Stage::Postprocessor);
        }
        if self.handler.is_some() {
            s.push(Stage::Rule);
        }
        s
    }
}

/// The guest's deadline passed.
#[derive(Debug)]
struct DeadlineHit;

impl std::fmt::Display for DeadlineHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("plugin call deadline exceeded")
    }
}

impl std::error::Error for DeadlineHit {}

/// Epoch ticks a guest runs between yields to the executor (10 ms).
const YIELD_TICKS: u64 = 5;

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()) as u64 + 1
}

/// One instance of a component in its own store, serving one binding; a call
/// that faults poisons it.
pub struct Instance {
    store: Store<HostState>,
    preprocess: Option<preprocess::Guest>,
    template: Option<template::Guest>,
    postprocess: Option<postprocess::Guest>,
    handler: Option<handler::Guest>,
    fuel: u64,
    poisoned: bool,
    /// Instantiation and calls begun so far: the first two (instantiation
    /// and the first call, where a plugin loads what it keeps) run under
    /// `load_timeout_ms`, later ones under `call_timeout_ms`.
    begun: u32,
}

impl Instance {
    /// Instantiates the component for `binding`, under the same limits as a
    /// call (a start function that loops or allocates is stopped too).
    pub async fn new(
        engine: &Engine,
        exports: &Exports,
        binding: Arc<BindingCtx>,
    ) -> Result<Self, CallError> {
        let fuel = binding.limits.fuel;
        let mut store = Store::new(engine, HostState::new(binding));
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut ctx| {
            let now = Instant::now();
            let c = &mut ctx.data_mut().clock;
            // Checks come every slice while the guest runs; a longer gap is
            // time spent waiting for the executor after a yield, which is
            // not the guest's.
            let gap = now.duration_since(c.last_check);
            c.host_wait += gap.saturating_sub(2 * YIELD_TICKS as u32 * TICK);
            c.last_check = now;
            let c = *c;
            let used = c.started.elapsed().saturating_sub(c.host_wait);
            if used >= c.budget {
                return Err(wasmtime::Error::new(DeadlineHit));
            }
            // Yield to the executor every slice: a guest that computes for
            // its whole budget must not hold a worker thread that long (with
            // one worker, the MQTT event loop would stop reading meanwhile).
            Ok(UpdateDeadline::Yield(
                ticks(c.budget - used).min(YIELD_TICKS),
            ))
        });
        let mut instance = Instance {
            store,
            preprocess: None,
            template: None,
            postprocess: None,
            handler: None,
            fuel,
            poisoned: false,
            begun: 0,
        };
        instance.begin();
        let inst = match exports.pre.instantiate_async(&mut instance.store).await {
            Ok(i) => i,
            Err(e) => return Err(instance.fault(e)),
        };
        let store = &mut instance.store;
        let incompatible = |stage: Stage| {
            move |e: wasmtime::Error| CallError::Incompatible {
                stage,
                reason: format!("{e:#}"),
            }
        };
        instance.preprocess = exports
            .preprocess
            .as_ref()
            .map(|i| i.load(&mut *store, &inst))
            .transpose()
            .map_err(incompatible(Stage::Preprocessor))?;
        instance.template = exports
            .template
            .as_ref()
            .map(|i| i.load(&mut *store, &inst))
            .transpose()
            .map_err(incompatible(Stage::PromptTemplate))?;
        instance.postprocess = exports
            .postprocess
            .as_ref()
            .map(|i| i.load(&mut *store, &inst))
            .transpose()
            .map_err(incompatible(Stage::Postprocessor))?;
        instance.handler = exports
            .handler
            .as_ref()
            .map(|i| i.load(&mut *store, &inst))
            .transpose()
            .map_err(incompatible(Stage::Rule))?;
        Ok(instance)
    }

    /// True once the instance's memories and tables together have grown past
    /// three quarters of the cap. Garbage-collected guests (JavaScript,
    /// Python) never give memory back, so such an instance would sooner or
    /// later fault on some message; it is retired after its call instead.
    pub fn is_worn(&self) -> bool {
        let limiter = &self.store.data().limiter;
        limiter.total > limiter.max_bytes / 4 * 3
    }

    /// Fuel the last call (or the instantiation) used; 0 when calls are
    /// unmetered (`fuel = 0`).
    pub fn fuel_used(&self) -> u64 {
        if self.fuel == 0 {
            return 0;
        }
        self.fuel.saturating_sub(self.store.get_fuel().unwrap_or(0))
    }

    /// Bytes of the instance's memories and tables now, as the memory cap
    /// counts them.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limiter.total
    }

    /// True once the instance trapped or was stopped: it must not be reused.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    fn begin(&mut self) {
        let data = self.store.data_mut();
        data.clock.started = Instant::now();
        data.clock.last_check = data.clock.started;
        data.clock.host_wait = Duration::ZERO;
        data.clock.logs = 0;
        data.clock.llm_calls = 0;
        data.clock.llm_time = Duration::ZERO;
        data.limiter.denied = None;
        let limits = &data.binding.limits;
        let budget = if self.begun < 2 {
            limits.load_timeout()
        } else {
            limits.call_timeout()
        };
        self.begun = self.begun.saturating_add(1);
        data.clock.budget = budget;
        self.store
            .set_epoch_deadline(ticks(budget).min(YIELD_TICKS));
        if self.fuel > 0 {
            // Fails only when the engine was built without fuel metering.
            let _ = self.store.set_fuel(self.fuel);
        }
    }

    /// Classifies a fault (trap, deadline, memory cap) and poisons the instance.
    fn fault(&mut self, e: wasmtime::Error) -> CallError {
        self.poisoned = true;
        let data = self.store.data();
        if e.downcast_ref::<DeadlineHit>().is_some() {
            return CallError::Deadline {
                limit: data.clock.budget,
            };
        }
        if let Some(bytes) = data.limiter.denied {
            return CallError::MemoryLimit {
                limit: data.limiter.max_bytes,
                requested: bytes,
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            return CallError::FuelExhausted { fuel: self.fuel };
        }
        let trap = e.downcast_ref::<Trap>().map(|t| t.to_string());
        CallError::Trap(trap.unwrap_or_else(|| format!("{e:#}")))
    }

    fn cap(&self, size: usize) -> Result<(), CallError> {
        let cap = self.store.data().binding.limits.max_output_bytes;
        if size > cap {
            return Err(CallError::OutputTooLarge { size, cap });
        }
        Ok(())
    }

    fn finish<T>(
        &mut self,
        r: wasmtime::Result<
            Result<T, super::v0_1_0::bindings::ganglion::plugin::types::PluginError>,
        >,
    ) -> Result<T, CallError> {
        match r {
            Err(e) => Err(self.fault(e)),
            Ok(Err(e)) => Err(CallError::Plugin(convert::plugin_error_out(e))),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Calls `preprocess`; the output is checked against `max_output_bytes`
    /// and for name indexes out of range.
    pub async fn preprocess(
        &mut self,
        message: &Message,
        readings: ReadingBatch,
    ) -> Result<ReadingBatch, CallError> {
        let guest = self
            .preprocess
            .clone()
            .ok_or(CallError::NotExported(Stage::Preprocessor))?;
        self.begin();
        let r = guest
            .call_preprocess(
                &mut self.store,
                &convert::message_in(message),
                &convert::batch_in(readings),
            )
            .await;
        let batch = convert::batch_out(self.finish(r)?);
        self.cap(batch.data_size())?;
        batch.validate().map_err(CallError::InvalidOutput)?;
        Ok(batch)
    }

    /// Calls `render`; the prompt's text is checked against `max_output_bytes`.
    pub async fn render(
        &mut self,
        context: &Context,
        window: ReadingBatch,
    ) -> Result<Prompt, CallError> {
        let guest = self
            .template
            .clone()
            .ok_or(CallError::NotExported(Stage::PromptTemplate))?;
        self.begin();
        let r = guest
            .call_render(
                &mut self.store,
                &convert::context_in(context),
                &convert::batch_in(window),
            )
            .await;
        let prompt = convert::prompt_out(self.finish(r)?);
        self.cap(prompt.system.len() + prompt.user.len())?;
        Ok(prompt)
    }

    /// Calls `postprocess`; the actions are checked against `max_output_bytes`.
    pub async fn postprocess(
        &mut self,
        context: &Context,
        window: ReadingBatch,
        completion: Option<&Completion>,
    ) -> Result<Vec<Action>, CallError> {
        let guest = self
            .postprocess
            .clone()
            .ok_or(CallError::NotExported(Stage::Postprocessor))?;
        self.begin();
        let completion = completion.map(convert::completion_in);
        let r = guest
            .call_postprocess(
                &mut self.store,
                &convert::context_in(context),
                &convert::batch_in(window),
                completion.as_ref(),
            )
            .await;
        let actions: Vec<Action> = self
            .finish(r)?
            .into_iter()
            .map(convert::action_out)
            .collect();
        self.cap(actions.iter().map(Action::data_size).sum())?;
        Ok(actions)
    }

    /// Calls `handle`; the actions are checked against `max_output_bytes`.
    pub async fn handle(
        &mut self,
        rule: &str,
        message: &Message,
    ) -> Result<Vec<Action>, CallError> {
        let guest = self
            .handler
            .clone()
            .ok_or(CallError::NotExported(Stage::Rule))?;
        self.begin();
        let r = guest
            .call_handle(&mut self.store, rule, &convert::message_in(message))
            .await;
        let actions: Vec<Action> = self
            .finish(r)?
            .into_iter()
            .map(convert::action_out)
            .collect();
        self.cap(actions.iter().map(Action::data_size).sum())?;
        Ok(actions)
    }
}
