//! The Rego engine: a policy set compiled once, an evaluator prepared once per cluster state
//! (a fresh virtual machine per decision reuses its program and data), and the decision with
//! its safety rails.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use json_patch::Patch;
use regorus::MemoryBudgetConfig;
use regorus::utils::limits::ExecutionTimerConfig;
use serde::Serialize;
use serde_json::Value;

use super::guard::{Bounds, Breach, Guard};
use super::input::{containers, containers_after, placement_key, pod_placement, with_keys};
use super::rails::checked_patch;
use super::{
    AllowedPaths, PolicyError, PolicyRequest, PolicySet, Settings, build_input, coral_data,
};
use crate::index::{ClusterIndex, Placement};

/// Package whose `patch`, `warn` and `deny` rules make the decision.
pub const DECISION_PACKAGE: &str = "data.coral.mutate";

/// What regorus answers when asked to evaluate a rule that no policy defines.
const UNDEFINED_RULE_PATH: &str = "not a valid rule path";

/// Default bound on one evaluation of the policies.
pub const DEFAULT_EVAL_TIMEOUT: Duration = Duration::from_millis(250);

/// Default bound on the memory one evaluation allocates.
pub const DEFAULT_EVAL_MEMORY: u64 = 64 << 20;

/// The rules of [`DECISION_PACKAGE`] that make a decision.
const DECISION_RULES: [&str; 3] = ["patch", "warn", "deny"];

/// A policy set parsed and checked, without cluster data.
#[derive(Debug, Clone)]
pub struct CompiledPolicies {
    engine: regorus::Engine,
    settings: Settings,
    origin: String,
    /// The decision rules the set defines; an absent rule decides nothing.
    rules: Vec<&'static str>,
    /// How its decisions may be cached.
    cache_keying: super::CacheKeying,
}

impl CompiledPolicies {
    /// Parses every file and checks that the set compiles and defines `package coral.mutate`.
    /// A syntax error names the file and line.
    pub fn compile(set: &PolicySet) -> Result<Self, PolicyError> {
        // Anything compiled while the ceiling was lowered is compiled again.
        Guard::global().unaffected(|| Self::compile_once(set))
    }

    fn compile_once(set: &PolicySet) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        let mut packages = Vec::new();
        for file in &set.files {
            check_nesting(&file.name, &file.source).map_err(|message| PolicyError::Compile {
                origin: set.origin.clone(),
                message,
            })?;
            let package = engine
                .add_policy(file.name.clone(), file.source.clone())
                .map_err(|e| PolicyError::Compile {
                    origin: set.origin.clone(),
                    message: e.to_string(),
                })?;
            packages.push(package);
        }
        if !packages.iter().any(|p| p == DECISION_PACKAGE) {
            return Err(PolicyError::Compile {
                origin: set.origin.clone(),
                message: format!(
                    "no file declares `package {}`, whose patch, warn and deny rules make the decision",
                    DECISION_PACKAGE.trim_start_matches("data.")
                ),
            });
        }
        let mut compiled = Self {
            engine,
            settings: set.settings.clone(),
            origin: set.origin.clone(),
            rules: Vec::new(),
            cache_keying: super::CacheKeying::of(set),
        };
        // Preparing the engine runs the static analysis (unknown functions, recursion, …), so
        // a set that cannot evaluate is rejected here rather than on the first request. The
        // engine refuses to evaluate a rule no file defines; that is how absent rules show.
        let mut probe = compiled.engine.clone();
        probe
            .add_data(
                rego(&coral_data(&ClusterIndex::new(), &compiled.settings))
                    .map_err(|e| compiled.compile_error(e))?,
            )
            .map_err(|e| compiled.compile_error(e))?;
        probe.set_input(regorus::Value::new_object());
        probe.set_execution_timer_config(timer(DEFAULT_EVAL_TIMEOUT));
        let bounds = Bounds {
            time: DEFAULT_EVAL_TIMEOUT,
            memory: DEFAULT_EVAL_MEMORY,
        };
        for rule in DECISION_RULES {
            match guarded(bounds, || {
                probe.eval_rule(format!("{DECISION_PACKAGE}.{rule}"))
            }) {
                Ok(_) => compiled.rules.push(rule),
                Err(Failure::Engine(e)) if e.to_string() == UNDEFINED_RULE_PATH => {}
                // Over a bound on an empty input is a matter for the probe evaluation
                // (`Snapshot::probe`) and for requests, not a compile error.
                Err(Failure::Bound(_)) => compiled.rules.push(rule),
                Err(Failure::Engine(e)) if is_timeout(&e) => compiled.rules.push(rule),
                Err(Failure::Engine(e)) => return Err(compiled.compile_error(e)),
            }
        }
        compiled
            .engine
            .add_policy(
                "<coral decision>".to_string(),
                decision_wrapper(&compiled.rules),
            )
            .map_err(|e| compiled.compile_error(e))?;
        Ok(compiled)
    }

    fn compile_error(&self, error: anyhow::Error) -> PolicyError {
        PolicyError::Compile {
            origin: self.origin.clone(),
            message: error.to_string(),
        }
    }

    /// The settings that came with the policy set.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Where the policy set came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How decisions of these policies may be cached.
    pub fn cache_keying(&self) -> super::CacheKeying {
        self.cache_keying
    }
}

/// Deepest nesting of brackets a policy file may have. The parser's time grows steeply with
/// unclosed brackets (48 held it for minutes: found by the policy_configmap fuzz target);
/// real policies nest a few levels.
const MAX_NESTING: usize = 16;

/// Refuses a file whose `(`, `[` and `{` (outside strings and comments) nest deeper than
/// [`MAX_NESTING`], naming the line.
fn check_nesting(name: &str, source: &str) -> Result<(), String> {
    let mut depth = 0usize;
    let mut line = 1;
    let mut chars = source.chars();
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' | '\n' => {
                            line += usize::from(c == '\n');
                            break;
                        }
                        _ => {}
                    }
                }
            }
            '`' => {
                for c in chars.by_ref() {
                    line += usize::from(c == '\n');
                    if c == '`' {
                        break;
                    }
                }
            }
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(format!(
                        "{name}:{line}: brackets nested deeper than {MAX_NESTING} levels"
                    ));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A rule gathering the decision rules into one object, so that one evaluation computes the
/// helpers they share once. The package name is reserved.
const DECISION_WRAPPER: &str = "data.coral_decision_internal.decision";

fn decision_wrapper(rules: &[&str]) -> String {
    let fields: Vec<String> = rules
        .iter()
        .map(|rule| format!("\"{rule}\": {DECISION_PACKAGE}.{rule}"))
        .collect();
    format!(
        "package coral_decision_internal\n\ndecision := {{{}}}\n",
        fields.join(", ")
    )
}

/// Options of an evaluator, fixed at start-up.
#[derive(Debug, Clone)]
pub struct EvaluatorOptions {
    pub allowed_paths: AllowedPaths,
    pub timeout: Duration,
    /// Bytes one evaluation may allocate; past them it fails (`PolicyError::Memory`).
    pub memory_budget: u64,
    /// Memory for decisions already made with a snapshot (see [`super::DecisionCache`]);
    /// 0 caches nothing.
    pub decision_cache_bytes: usize,
}

impl Default for EvaluatorOptions {
    fn default() -> Self {
        Self {
            allowed_paths: AllowedPaths::default(),
            timeout: DEFAULT_EVAL_TIMEOUT,
            memory_budget: DEFAULT_EVAL_MEMORY,
            decision_cache_bytes: 0,
        }
    }
}

/// Policies with one snapshot of `data`, prepared once and shared by every decision.
#[derive(Debug, Clone)]
pub struct Evaluator {
    backend: Backend,
    rules: Vec<&'static str>,
    options: EvaluatorOptions,
}

/// How decisions are evaluated: regorus' compiled virtual machine when it can compile the set
/// (several times faster), otherwise its tree-walking interpreter.
#[derive(Clone)]
enum Backend {
    Vm {
        policy: regorus::CompiledPolicy,
        program: Arc<regorus::rvm::Program>,
        data: regorus::Value,
        pool: Arc<VmPool>,
    },
    Interpreter(Arc<regorus::Engine>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Vm { .. } => "Backend::Vm",
            Self::Interpreter(_) => "Backend::Interpreter",
        })
    }
}

/// One input loaded into a backend, ready to evaluate rules.
enum Session<'a> {
    Vm(PooledVm<'a>),
    Interpreter(Box<regorus::Engine>),
}

impl Session<'_> {
    fn eval(&mut self, rule: &str) -> anyhow::Result<regorus::Value> {
        match self {
            Self::Vm(vm) => vm
                .vm
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("the virtual machine was returned"))?
                .execute_entry_point_by_name(rule)
                .map_err(|e| anyhow::anyhow!("{e}")),
            Self::Interpreter(engine) => engine.eval_rule(rule.to_string()),
        }
    }
}

/// Virtual machines loaded with an evaluator's program and data, kept for the next
/// evaluation: every execution starts from a clean state, so only the input changes.
#[derive(Default)]
#[allow(clippy::vec_box)] // a machine is large: boxed, it moves in and out as a pointer
struct VmPool(Mutex<Vec<Box<regorus::rvm::RegoVM>>>);

/// Machines kept per evaluator: one per worker is enough.
const POOLED_VMS: usize = 16;

/// A machine borrowed from the pool, returned when dropped.
struct PooledVm<'a> {
    vm: Option<Box<regorus::rvm::RegoVM>>,
    pool: &'a VmPool,
}

impl Drop for PooledVm<'_> {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            // The input is not kept alive between requests.
            vm.set_input(regorus::Value::Undefined);
            let mut pool = self.pool.0.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.len() < POOLED_VMS {
                pool.push(vm);
            }
        }
    }
}

/// Which rules one evaluation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The decision: patch, warn and deny.
    Decide,
    /// The convergence check: patch only.
    Converge,
}

/// The raw output of the policies for one input, before the rails.
#[derive(Debug, Default, PartialEq)]
pub struct RuleOutput {
    pub patch: Vec<Value>,
    pub warn: Vec<String>,
    pub deny: Vec<String>,
}

/// What a decision reads besides the request.
struct Context<'a> {
    namespace_labels: &'a BTreeMap<String, String>,
    placement: &'a Placement,
    /// The original object's placement, and what it was computed from.
    original: (Value, &'a Value),
}

/// What the policies decided for one object, after the rails.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The difference between the original and the patched object.
    pub patch: Patch,
    pub warnings: Vec<String>,
    pub denials: Vec<String>,
    /// The object with the patch applied.
    pub object: Value,
}

impl Evaluator {
    /// Prepares the policies with `data` (from [`super::coral_data`]).
    pub fn new(
        policies: &CompiledPolicies,
        data: Value,
        options: EvaluatorOptions,
    ) -> Result<Self, PolicyError> {
        // An evaluator prepared while the ceiling was lowered is prepared again.
        Guard::global().unaffected(|| Self::new_once(policies, &data, options.clone()))
    }

    fn new_once(
        policies: &CompiledPolicies,
        data: &Value,
        options: EvaluatorOptions,
    ) -> Result<Self, PolicyError> {
        let mut engine = policies.engine.clone();
        engine
            .add_data(rego(data).map_err(|e| PolicyError::Data(e.to_string()))?)
            .map_err(|e| PolicyError::Data(e.to_string()))?;
        engine.set_execution_timer_config(timer(options.timeout));
        let backend = match Self::compile_vm(&mut engine, &policies.rules) {
            Some(vm) => vm,
            None => {
                // Evaluate once so that every clone starts prepared. The engine is prepared
                // before it evaluates, so an error here (say, a policy too slow for an empty
                // input) still leaves it prepared; static errors were caught at compile time.
                engine.set_input(regorus::Value::new_object());
                if let Some(rule) = policies.rules.first() {
                    let _ = guarded(options.bounds(), || {
                        engine.eval_rule(format!("{DECISION_PACKAGE}.{rule}"))
                    });
                }
                Backend::Interpreter(Arc::new(engine))
            }
        };
        Ok(Self {
            backend,
            rules: policies.rules.clone(),
            options,
        })
    }

    /// Compiles the decision rules for the virtual machine; `None` when the set uses
    /// something the machine does not support.
    fn compile_vm(engine: &mut regorus::Engine, rules: &[&'static str]) -> Option<Backend> {
        let mut entry_points = vec![DECISION_WRAPPER.to_string()];
        entry_points.extend(
            rules
                .iter()
                .map(|rule| format!("{DECISION_PACKAGE}.{rule}")),
        );
        let first: Arc<str> = DECISION_WRAPPER.into();
        let policy = engine.compile_with_entrypoint(&first).ok()?;
        let names: Vec<&str> = entry_points.iter().map(String::as_str).collect();
        let program =
            regorus::languages::rego::compiler::Compiler::compile_from_policy(&policy, &names)
                .ok()?;
        Some(Backend::Vm {
            policy,
            program,
            data: engine.get_data(),
            pool: Arc::default(),
        })
    }

    /// Whether decisions run on the compiled virtual machine.
    pub fn uses_vm(&self) -> bool {
        matches!(self.backend, Backend::Vm { .. })
    }

    /// Decides one request: evaluates the policies, applies the rails, checks convergence and
    /// returns the patch as the diff of the original and the patched object.
    pub fn decide(
        &self,
        request: &PolicyRequest,
        namespace_labels: &BTreeMap<String, String>,
        placement: &Placement,
    ) -> Result<Decision, PolicyError> {
        let started = Instant::now();
        let kind = request.workload_kind()?;
        let original = &request.object;
        let mut entries = containers(original, kind);
        with_keys(&mut entries, placement);
        let where_to = pod_placement(placement, original, kind, &entries);
        let first = self.evaluate(
            build_input(
                request,
                kind,
                original,
                entries.clone(),
                namespace_labels,
                where_to.clone(),
            ),
            Pass::Decide,
        )?;
        if !first.deny.is_empty() {
            return Ok(Decision {
                allowed: false,
                patch: Patch(Vec::new()),
                warnings: first.warn,
                denials: first.deny,
                object: original.clone(),
            });
        }

        let patch = checked_patch(first.patch, kind, &self.options.allowed_paths)?;
        let mut patched = original.clone();
        if !patch.0.is_empty() {
            json_patch::patch(&mut patched, &patch).map_err(|e| PolicyError::Rail {
                rule: "patch does not apply",
                message: e.to_string(),
            })?;
            kind.check_typed(&patched).map_err(|e| PolicyError::Rail {
                rule: "patched object is not a valid Kubernetes object",
                message: format!("{} does not deserialize: {e}", kind.name()),
            })?;
            let context = Context {
                namespace_labels,
                placement,
                original: (placement_key(original, kind, &entries), &where_to),
            };
            self.check_convergence(request, kind, &patched, &entries, context)?;
        }
        if started.elapsed() > self.options.timeout {
            return Err(PolicyError::Timeout(self.options.timeout));
        }
        Ok(Decision {
            allowed: true,
            patch: json_patch::diff(original, &patched),
            warnings: first.warn,
            denials: Vec::new(),
            object: patched,
        })
    }

    /// Evaluating the policies on the patched object must change nothing more.
    fn check_convergence(
        &self,
        request: &PolicyRequest,
        kind: crate::policy::WorkloadKind,
        patched: &Value,
        previous: &[Value],
        context: Context<'_>,
    ) -> Result<(), PolicyError> {
        let mut entries = containers_after(patched, kind, previous);
        with_keys(&mut entries, context.placement);
        // A patch that leaves what placement reads alone (the usual one: Coral's own
        // nodeSelector entries, pull policies) leaves the placement as it was.
        let (key, known) = &context.original;
        let where_to = if placement_key(patched, kind, &entries) == *key {
            (*known).clone()
        } else {
            pod_placement(context.placement, patched, kind, &entries)
        };
        let second = self.evaluate(
            build_input(
                request,
                kind,
                patched,
                entries,
                context.namespace_labels,
                where_to,
            ),
            Pass::Converge,
        )?;
        if second.patch.is_empty() {
            return Ok(());
        }
        let not_converged = |detail: String| PolicyError::Rail {
            rule: "policies do not converge",
            message: format!("evaluating the patched object changes it again: {detail}"),
        };
        let again = checked_patch(second.patch, kind, &self.options.allowed_paths)?;
        let mut twice = patched.clone();
        json_patch::patch(&mut twice, &again).map_err(|e| not_converged(e.to_string()))?;
        if &twice != patched {
            let ops = serde_json::to_string(&json_patch::diff(patched, &twice))
                .unwrap_or_else(|e| e.to_string());
            return Err(not_converged(ops));
        }
        Ok(())
    }

    /// A fresh evaluation context for one input.
    fn session(&self, input: regorus::Value) -> Result<Session<'_>, PolicyError> {
        Ok(match &self.backend {
            Backend::Vm {
                policy,
                program,
                data,
                pool,
            } => {
                let pooled = pool.0.lock().unwrap_or_else(PoisonError::into_inner).pop();
                let mut vm = match pooled {
                    Some(vm) => vm,
                    None => {
                        let mut vm = regorus::rvm::RegoVM::new_with_policy(policy.clone());
                        vm.load_program(program.clone());
                        vm.set_data(data.clone())
                            .map_err(|e| PolicyError::Data(e.to_string()))?;
                        // The time bound is the limit; the machine's default instruction cap
                        // (25,000) would cut off legitimate policies on large objects.
                        vm.set_max_instructions(usize::MAX);
                        vm.set_execution_timer_config(Some(timer(self.options.timeout)));
                        vm.set_memory_budget_config(
                            NonZeroU64::new(self.options.memory_budget)
                                .map(|limit| MemoryBudgetConfig { limit }),
                        );
                        Box::new(vm)
                    }
                };
                vm.set_input(input);
                Session::Vm(PooledVm { vm: Some(vm), pool })
            }
            Backend::Interpreter(engine) => {
                let mut engine = (**engine).clone();
                engine.set_input(input);
                Session::Interpreter(Box::new(engine))
            }
        })
    }

    /// One evaluation of the policies on an input made by [`build_input`]: what a decision
    /// makes of the rules, before the rails. The decision's two passes are two of these.
    pub fn evaluate(&self, input: Value, pass: Pass) -> Result<RuleOutput, PolicyError> {
        let gathered = guarded(self.options.bounds(), || self.run(rego(&input)?, pass))
            .map_err(|failure| failure.into_error(&self.options))?;
        let mut output = RuleOutput::default();
        for (rule, value) in gathered {
            let items = set_items(rule, value)?;
            match rule {
                "patch" => output.patch = items,
                "warn" => output.warn = strings(rule, items)?,
                _ => output.deny = strings(rule, items)?,
            }
        }
        Ok(output)
    }

    /// Evaluates the rules `pass` needs on `input`: each rule's value.
    fn run(
        &self,
        input: regorus::Value,
        pass: Pass,
    ) -> anyhow::Result<Vec<(&'static str, regorus::Value)>> {
        let mut session = self.session(input).map_err(|e| anyhow::anyhow!("{e}"))?;
        // The decision pass asks for all rules at once; the convergence pass only needs to
        // know whether the object changes again.
        let gathered = match pass {
            Pass::Decide => session.eval(DECISION_WRAPPER)?,
            Pass::Converge => regorus::Value::Undefined,
        };
        let mut values = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            if pass == Pass::Converge && *rule != "patch" {
                continue;
            }
            let value = match gathered.as_object() {
                Ok(fields) => fields
                    .get(&regorus::Value::from(*rule))
                    .cloned()
                    .unwrap_or(regorus::Value::Undefined),
                // A rule written as a complete rule may be undefined, and the gathered object
                // with it: ask each rule on its own.
                Err(_) => session.eval(&format!("{DECISION_PACKAGE}.{rule}"))?,
            };
            values.push((*rule, value));
        }
        Ok(values)
    }
}

impl EvaluatorOptions {
    fn bounds(&self) -> Bounds {
        Bounds {
            time: self.timeout,
            memory: self.memory_budget,
        }
    }
}

/// Why one guarded run of the engine failed.
enum Failure {
    /// The guard found a bound broken.
    Bound(Breach),
    /// The engine's own answer.
    Engine(anyhow::Error),
}

impl Failure {
    fn into_error(self, options: &EvaluatorOptions) -> PolicyError {
        match self {
            Self::Bound(Breach::Time) => PolicyError::Timeout(options.timeout),
            Self::Bound(Breach::Memory | Breach::Crowd) => {
                PolicyError::Memory(options.memory_budget)
            }
            Self::Engine(e) => classify_eval_error(&e, options),
        }
    }
}

/// Runs the engine under the guard (see [`Guard::evaluate`]).
fn guarded<T>(bounds: Bounds, run: impl FnMut() -> anyhow::Result<T>) -> Result<T, Failure> {
    match Guard::global().evaluate(bounds, run) {
        Ok(answer) => answer.map_err(Failure::Engine),
        Err(breach) => Err(Failure::Bound(breach)),
    }
}

/// `value` as the engine holds it. Unlike regorus' `From`, which makes a value it cannot
/// convert undefined, this says why (the allocator ceiling, say).
pub(super) fn rego(value: &Value) -> anyhow::Result<regorus::Value> {
    use serde::Deserialize;
    regorus::Value::deserialize(value)
        .map_err(|e| anyhow::anyhow!("converting a value for the policies: {e}"))
}

/// A time bound checked every 256 steps of the engine (a few microseconds of work).
fn timer(limit: Duration) -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit,
        check_interval: NonZeroU32::MIN.saturating_add(255),
    }
}

/// regorus reports "execution exceeded time limit (elapsed=…, limit=…)".
fn is_timeout(error: &anyhow::Error) -> bool {
    error.to_string().contains("exceeded time limit")
}

fn classify_eval_error(error: &anyhow::Error, options: &EvaluatorOptions) -> PolicyError {
    let message = error.to_string();
    if is_timeout(error) {
        PolicyError::Timeout(options.timeout)
    } else if message.contains("exceeded memory budget") {
        PolicyError::Memory(options.memory_budget)
    } else {
        PolicyError::Evaluation(message)
    }
}

/// The members of a partial-set rule; an undefined rule is an empty set.
fn set_items(rule: &str, value: regorus::Value) -> Result<Vec<Value>, PolicyError> {
    if value == regorus::Value::Undefined {
        return Ok(Vec::new());
    }
    let json = serde_json::to_value(&value).map_err(|e| PolicyError::Evaluation(e.to_string()))?;
    match json {
        Value::Array(items) => Ok(items),
        other => Err(PolicyError::Evaluation(format!(
            "{DECISION_PACKAGE}.{rule} must be a set (`{rule} contains …`), got {other}"
        ))),
    }
}

fn strings(rule: &str, items: Vec<Value>) -> Result<Vec<String>, PolicyError> {
    items
        .into_iter()
        .map(|item| match item {
            Value::String(s) => Ok(s),
            other => Err(PolicyError::Evaluation(format!(
                "{DECISION_PACKAGE}.{rule} must hold strings, got {other}"
            ))),
        })
        .collect()
}
