//! Loading: the schema, and policy sets from directories of `*.cedar` files, strictly validated.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Effect, Policy, PolicyId, Request, Schema, ValidationMode, Validator};
use meshward_identity::SpiffeId;
use miette::Diagnostic;

use super::index::{ScopeIndex, Slice, SliceCache};
use super::plan::{ContextNeeds, Plan, PlanInput, PolicyFacts};
use super::request::{Action, AuthzRequest, EntityTypes};
use super::{Decision, Mode, evaluate};
use crate::normalize::NormalizedPath;

/// The schema shipped in the binary (`policies/schema.cedarschema`).
pub const BUILTIN_SCHEMA: &str = include_str!("../../../policies/schema.cedarschema");

/// The Cedar schema policies are validated against, checked to accept the proxy's requests.
#[derive(Debug)]
pub struct PolicySchema {
    schema: Schema,
    types: EntityTypes,
    name: String,
}

/// Why a schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema file cannot be read.
    #[error("cannot read schema `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The schema does not parse.
    #[error("schema `{name}` does not parse: {message}")]
    Parse {
        /// File name or `built-in`.
        name: String,
        /// Cedar's message, with line and column.
        message: String,
    },
    /// The schema parses but does not describe the requests the proxy makes.
    #[error("schema `{name}` does not fit meshward's requests: {message}")]
    Incompatible {
        /// File name or `built-in`.
        name: String,
        /// What did not fit.
        message: String,
    },
}

/// A validated policy set: every `*.cedar` file of one directory, indexed for deciding.
#[derive(Debug)]
pub struct PolicySet {
    origin: String,
    schema: Arc<PolicySchema>,
    policies: Vec<Policy>,
    /// What each policy does with `context`, and its compiled conditions, by position; worked
    /// out at load so that the first decision of a pair reads no policy text.
    facts: Vec<PolicyFacts>,
    full: cedar_policy::PolicySet,
    info: BTreeMap<String, PolicyInfo>,
    warnings: Vec<String>,
    index: ScopeIndex,
    cache: SliceCache,
}

/// One policy of a set, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// The `@id` annotation.
    pub id: String,
    /// `true` for `permit`, `false` for `forbid`.
    pub permit: bool,
    /// The file it is in.
    pub file: String,
    /// 1-based line of its first character.
    pub line: usize,
    /// The policy text exactly as written.
    pub text: String,
}

/// Why a policy set was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// The directory cannot be listed.
    #[error("cannot read policy directory `{path}`: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A policy file cannot be read (or is not UTF-8).
    #[error("cannot read policy file `{path}`: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Files were read, but something in them does not parse or validate.
    #[error("policy set `{origin}` is refused: {}", join_problems(.problems))]
    Invalid {
        /// The directory (or name) of the set.
        origin: String,
        /// Every problem found, in file order.
        problems: Vec<PolicyProblem>,
    },
}

/// One problem in one policy file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The file.
    pub file: String,
    /// 1-based line; 0 when Cedar gave no position.
    pub line: usize,
    /// 1-based column; 0 when Cedar gave no position.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl PolicySchema {
    /// The schema built into the binary.
    pub fn builtin() -> Result<Self, SchemaError> {
        Self::parse("built-in", BUILTIN_SCHEMA)
    }

    /// Reads a `.cedarschema` file (`--schema`).
    pub fn from_file(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses schema text, then checks that it accepts every request shape the proxy makes.
    pub fn parse(name: &str, text: &str) -> Result<Self, SchemaError> {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(text).map_err(|e| SchemaError::Parse {
                name: name.to_owned(),
                message: with_position(&e, text),
            })?;
        let incompatible = |message: String| SchemaError::Incompatible {
            name: name.to_owned(),
            message,
        };
        let types = EntityTypes::new().map_err(incompatible)?;
        let me = Self {
            schema,
            types,
            name: name.to_owned(),
        };
        me.check_request_shapes().map_err(incompatible)?;
        Ok(me)
    }

    /// The name it was loaded from (`built-in` or a file).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Cedar schema.
    pub fn cedar(&self) -> &Schema {
        &self.schema
    }

    pub(crate) fn types(&self) -> &EntityTypes {
        &self.types
    }

    /// Builds one request per action, with a Kubernetes-style and a plain SPIFFE ID, and has
    /// Cedar validate them (and the entities) against the schema. At decision time requests
    /// are not validated (it is slow); this makes sure they would pass.
    fn check_request_shapes(&self) -> Result<(), String> {
        let k8s =
            SpiffeId::parse("spiffe://example.org/ns/shop/sa/web").map_err(|e| e.to_string())?;
        let plain = SpiffeId::parse("spiffe://example.org/batch/job").map_err(|e| e.to_string())?;
        let path = NormalizedPath::root();
        let p = self.types.place(&k8s);
        let r = self.types.place(&plain);
        self.types.entities(&p, &r, &self.schema)?;
        for action in Action::ALL {
            let request = AuthzRequest::http(
                k8s.clone(),
                plain.clone(),
                action,
                path.clone(),
                "example.org",
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            );
            let action_uid = self.types.action_uid(action)?;
            Request::new(
                p.uid.clone(),
                action_uid.clone(),
                r.uid.clone(),
                request.context(&self.types.ips, &ContextNeeds::ALL)?,
                Some(&self.schema),
            )
            .map_err(|e| format!("action `{action}`: {e}"))?;
        }
        Ok(())
    }
}

impl PolicySet {
    /// Loads every `*.cedar` file in `dir` (not its subdirectories), in name order.
    pub fn load_dir(dir: &Path, schema: Arc<PolicySchema>) -> Result<Self, PolicyLoadError> {
        let files = policy_files(dir)?;
        let mut sources = Vec::with_capacity(files.len());
        for path in files {
            let text =
                std::fs::read_to_string(&path).map_err(|source| PolicyLoadError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            sources.push((path.display().to_string(), text));
        }
        Self::from_sources(&dir.display().to_string(), &sources, schema)
    }

    /// Builds a set from `(file name, text)` pairs; `origin` names the set in errors.
    pub fn from_sources(
        origin: &str,
        sources: &[(String, String)],
        schema: Arc<PolicySchema>,
    ) -> Result<Self, PolicyLoadError> {
        let mut problems = Vec::new();
        let mut policies = Vec::new();
        let mut info: BTreeMap<String, PolicyInfo> = BTreeMap::new();
        // The file text of each policy, borrowed: a copy per policy of a 10,000-policy file
        // would be gigabytes.
        let mut text_of: BTreeMap<String, (&str, usize)> = BTreeMap::new();
        for (file, text) in sources {
            let parsed = match cedar_policy::PolicySet::from_str(text) {
                Ok(parsed) => parsed,
                Err(errors) => {
                    for e in errors.iter() {
                        problems.push(problem(file, text, e, e.to_string()));
                    }
                    continue;
                }
            };
            if let Some(template) = parsed.templates().next() {
                let line = offset_of(text, &template.to_cedar()).map_or(0, |o| line_col(text, o).0);
                problems.push(PolicyProblem {
                    file: file.clone(),
                    line,
                    column: 1,
                    message: "templates (`?principal`, `?resource`) are not supported: write static policies".to_owned(),
                });
            }
            for policy in parsed.policies() {
                let policy_text = policy.to_cedar().unwrap_or_default();
                let offset = offset_of(text, &policy_text).unwrap_or(0);
                let (line, column) = line_col(text, offset);
                let at = |message: String| PolicyProblem {
                    file: file.clone(),
                    line,
                    column,
                    message,
                };
                let Some(id) = policy.annotation("id") else {
                    problems.push(at(
                        "policy has no `@id(\"...\")` annotation; every policy needs one, decisions name it".to_owned(),
                    ));
                    continue;
                };
                if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    problems.push(at(format!(
                        "policy id `{id}` must be non-empty and have no spaces"
                    )));
                    continue;
                }
                if let Some(first) = info.get(id) {
                    problems.push(at(format!(
                        "policy id `{id}` is already used at {}:{}",
                        first.file, first.line
                    )));
                    continue;
                }
                info.insert(
                    id.to_owned(),
                    PolicyInfo {
                        id: id.to_owned(),
                        permit: policy.effect() == Effect::Permit,
                        file: file.clone(),
                        line,
                        text: policy_text.clone(),
                    },
                );
                text_of.insert(id.to_owned(), (text.as_str(), offset));
                policies.push(policy.new_id(PolicyId::new(id)));
            }
        }
        let full = match cedar_policy::PolicySet::from_policies(policies.iter().cloned()) {
            Ok(full) => full,
            Err(e) => {
                problems.push(PolicyProblem {
                    file: origin.to_owned(),
                    line: 0,
                    column: 0,
                    message: e.to_string(),
                });
                cedar_policy::PolicySet::new()
            }
        };
        let validation =
            Validator::new(schema.schema.clone()).validate(&full, ValidationMode::Strict);
        for e in validation.validation_errors() {
            let id = e.policy_id().to_string();
            match (info.get(&id), text_of.get(&id)) {
                (Some(policy), Some((text, _))) => {
                    problems.push(problem(&policy.file, text, e, e.to_string()));
                }
                _ => problems.push(PolicyProblem {
                    file: origin.to_owned(),
                    line: 0,
                    column: 0,
                    message: e.to_string(),
                }),
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            return Err(PolicyLoadError::Invalid {
                origin: origin.to_owned(),
                problems,
            });
        }
        let warnings = validation
            .validation_warnings()
            .map(|w| {
                let id = w.policy_id().to_string();
                match info.get(&id) {
                    Some(p) => format!("{}:{}: {w}", p.file, p.line),
                    None => w.to_string(),
                }
            })
            .collect();
        Ok(Self {
            origin: origin.to_owned(),
            index: ScopeIndex::build(&policies),
            schema,
            facts: policies.iter().map(PolicyFacts::of).collect(),
            policies,
            full,
            info,
            warnings,
            cache: SliceCache::default(),
        })
    }

    /// Where the set was loaded from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How many policies the set has.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether the set has no policies (everything is denied: "no policy permits").
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// How many `permit` and `forbid` policies the set has.
    pub fn counts(&self) -> (usize, usize) {
        let permits = self.info.values().filter(|p| p.permit).count();
        (permits, self.info.len() - permits)
    }

    /// Every policy, by id.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyInfo> {
        self.info.values()
    }

    /// One policy by id.
    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.info.get(id)
    }

    /// Validator warnings (the set is still in force).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The schema the set was validated against.
    pub fn schema(&self) -> &Arc<PolicySchema> {
        &self.schema
    }

    /// How many (principal key, resource key) buckets the index has.
    pub fn index_buckets(&self) -> usize {
        self.index.bucket_count()
    }

    /// How many (principal, resource) pairs have a cached slice.
    pub fn cached_pairs(&self) -> usize {
        self.cache.len()
    }

    /// Decides `request` against only the policies whose scopes can match it.
    pub fn decide(&self, request: &AuthzRequest, mode: Mode) -> Decision {
        let slice = self
            .cache
            .get_or_build(&request.principal, &request.resource, || {
                self.slice(request)
            });
        let slice = match slice {
            Ok(slice) => slice,
            Err(e) => return Decision::failed(mode, e),
        };
        if slice.candidates.is_empty() {
            // Nothing can permit, forbid or error: skip building a plan.
            return Decision::no_policy_permits(mode);
        }
        let Some(cell) = slice.plan(request.action) else {
            return Decision::failed(mode, format!("unknown action `{}`", request.action));
        };
        match cell.get_or_init(|| self.plan(&slice, request.action)) {
            Ok(plan) => plan.decide(
                request,
                &slice.principal,
                &slice.resource,
                &slice.entities,
                self.types(),
                mode,
            ),
            Err(e) => Decision::failed(mode, e.clone()),
        }
    }

    /// Decides `request` against the whole set, as plain Cedar would: the reference the index
    /// is tested against, and the baseline of the benchmarks. Slow with many policies.
    pub fn decide_unindexed(&self, request: &AuthzRequest, mode: Mode) -> Decision {
        let types = self.schema.types();
        let entities = match types.entities(
            &types.place(&request.principal),
            &types.place(&request.resource),
            &self.schema.schema,
        ) {
            Ok(entities) => entities,
            Err(e) => return Decision::failed(mode, e),
        };
        match self.cedar_request(request) {
            Ok(cedar) => evaluate(&cedar, &self.full, &entities, mode),
            Err(e) => Decision::failed(mode, e),
        }
    }

    fn slice(&self, request: &AuthzRequest) -> Result<Slice, String> {
        let types = self.schema.types();
        let principal = types.place(&request.principal);
        let resource = types.place(&request.resource);
        let candidates = self.index.candidates(&principal, &resource);
        let entities = types.entities(&principal, &resource, &self.schema.schema)?;
        Ok(Slice::new(
            principal.uid,
            resource.uid,
            candidates,
            entities,
        ))
    }

    fn plan(&self, slice: &Slice, action: Action) -> Result<Plan, String> {
        let action = self.types().action_uid(action)?;
        let policies = slice
            .candidates
            .iter()
            .filter_map(|&i| Some((self.policies.get(i)?, self.facts.get(i)?)))
            .collect();
        let input = PlanInput {
            principal: &slice.principal,
            resource: &slice.resource,
            entities: &slice.entities,
            policies,
        };
        Plan::build(&input, action)
    }

    fn types(&self) -> &EntityTypes {
        self.schema.types()
    }

    fn cedar_request(&self, request: &AuthzRequest) -> Result<Request, String> {
        let types = self.types();
        let action = types.action_uid(request.action)?;
        // Not validated against the schema here (slow); `PolicySchema::parse` checked the shape.
        Request::new(
            types.place(&request.principal).uid,
            action.clone(),
            types.place(&request.resource).uid,
            request.context(&types.ips, &ContextNeeds::ALL)?,
            None,
        )
        .map_err(|e| format!("cannot build the request: {e}"))
    }
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl PolicyLoadError {
    /// Every problem, for printing one per line (I/O errors are one problem).
    pub fn problems(&self) -> Vec<String> {
        match self {
            PolicyLoadError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

fn join_problems(problems: &[PolicyProblem]) -> String {
    let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
    format!("{} problem(s): {}", problems.len(), shown.join("; "))
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyLoadError> {
    let read_dir = |source| PolicyLoadError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        if path.extension().is_some_and(|e| e == "cedar") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A problem positioned at Cedar's first label, if it has one.
fn problem(file: &str, text: &str, diagnostic: &dyn Diagnostic, message: String) -> PolicyProblem {
    let offset = diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let (line, column) = offset.map_or((0, 0), |o| line_col(text, o));
    let message = match diagnostic.help() {
        Some(help) => format!("{message} (help: {help})"),
        None => message,
    };
    PolicyProblem {
        file: file.to_owned(),
        line,
        column,
        message,
    }
}

/// Cedar's message with its first position, for text without a file (the schema).
fn with_position(diagnostic: &dyn Diagnostic, text: &str) -> String {
    let p = problem("", text, diagnostic, diagnostic.to_string());
    if p.line == 0 {
        p.message
    } else {
        format!("line {}, column {}: {}", p.line, p.column, p.message)
    }
}

/// Where `needle` (a policy's own text, a slice of the file) starts in `text`.
fn offset_of(text: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.find(needle)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
