//! Cedar authorization: load and validate policy sets, and decide requests against them, fast.
//!
//! A [`PolicySet`] is every `*.cedar` file of one directory, parsed and validated *strictly*
//! against the schema (DESIGN.md §4 "Cedar model"); any problem refuses the whole set, with
//! file, line and column. Every policy carries an `@id("...")` annotation, and decisions name
//! policies by it.
//!
//! Deciding fails closed: Cedar *skips* a policy whose evaluation errors — a `forbid` too — so
//! a response with any error is a Deny here, whatever Cedar said; so is a request that cannot
//! be turned into Cedar's terms.
//!
//! Cedar scans every policy it is given. At 10,000 policies that is milliseconds per call, so
//! the set is indexed by each policy's principal and resource scope (`==` or `in` an entity,
//! or unconstrained), and a request is evaluated only against the policies whose scopes can
//! match its principal, resource and their ancestors (see `authz/index.rs`). For each action of
//! a pair, a plan (`authz/plan.rs`) then leaves out the policies whose action scope cannot
//! match, evaluates once those that never read `context`, evaluates natively the conditions of
//! the common shapes (`context.path like "…"`, `==` on context strings, `&&`, …; see
//! `authz/compiled.rs`), and gives Cedar only the rest, per request, with only the context
//! attributes they mention. The
//! `indexed_decision_equals_full_cedar_decision` property test holds all of it to Cedar's answer.

pub mod cases;
mod compiled;
mod index;
mod load;
mod plan;
mod request;

use std::fmt;
use std::sync::Arc;

use cedar_policy::{Authorizer as CedarAuthorizer, Decision as CedarDecision, Request, Response};
use serde::Serialize;

pub use load::{
    BUILTIN_SCHEMA, PolicyInfo, PolicyLoadError, PolicyProblem, PolicySchema, PolicySet,
    SchemaError,
};
pub use request::{Action, AuthzRequest, TlsFacts, UnknownActionError};

/// Whether a decision is enforced or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The decision is what happens to the request.
    Enforce,
    /// The decision is audited and counted, never enforced.
    DryRun,
}

/// The outcome of one authorization question, with what determined it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the request may proceed (always `false` when `errors` is not empty).
    pub allowed: bool,
    /// The `@id`s of the policies that determined the decision: the satisfied `permit`s of an
    /// allow, the satisfied `forbid`s of a deny; empty for a deny means "no policy permits".
    pub policies: Vec<String>,
    /// Evaluation and request-construction errors; any error makes the decision a deny.
    pub errors: Vec<String>,
    /// Enforced or dry-run.
    pub mode: Mode,
}

/// Decides requests: an enforced policy set, and optionally a dry-run set beside it.
///
/// Immutable; a reload builds a new one (see [`crate::policy_store`]).
#[derive(Debug)]
pub struct Authorizer {
    enforced: PolicySet,
    dry_run: Option<PolicySet>,
}

impl Decision {
    /// A human-readable reason, for the log and the 403 body.
    pub fn reason(&self) -> String {
        let ids = |ids: &[String]| {
            ids.iter()
                .map(|id| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.allowed {
            return format!("allowed by {}", ids(&self.policies));
        }
        if let Some(first) = self.errors.first() {
            let forbids = if self.policies.is_empty() {
                String::new()
            } else {
                format!(" and forbidden by {}", ids(&self.policies))
            };
            return format!("denied: evaluation error, failing closed ({first}){forbids}");
        }
        if self.policies.is_empty() {
            "denied: no policy permits".to_owned()
        } else {
            format!("denied by {}", ids(&self.policies))
        }
    }

    /// A deny for a request that could not be put to Cedar at all.
    pub(crate) fn failed(mode: Mode, error: String) -> Self {
        Self {
            allowed: false,
            policies: Vec::new(),
            errors: vec![error],
            mode,
        }
    }

    /// A deny because no policy can apply.
    pub(crate) fn no_policy_permits(mode: Mode) -> Self {
        Self {
            allowed: false,
            policies: Vec::new(),
            errors: Vec::new(),
            mode,
        }
    }

    /// Cedar's response, failing closed: any error turns it into a deny.
    pub(crate) fn from_response(response: &Response, mode: Mode) -> Self {
        let diagnostics = response.diagnostics();
        let errors = diagnostics.errors().map(ToString::to_string).collect();
        // Cedar's reasons are the satisfied permits of an allow, the satisfied forbids of a deny.
        let reasons = diagnostics.reason().map(ToString::to_string).collect();
        match response.decision() {
            CedarDecision::Allow => Self::combine(reasons, Vec::new(), errors, mode),
            CedarDecision::Deny => Self::combine(Vec::new(), reasons, errors, mode),
        }
    }

    /// The decision from the satisfied permits and forbids and the errors, as Cedar makes it
    /// and failing closed: any satisfied forbid denies (naming them), else any error denies
    /// (naming no policy), else any satisfied permit allows. Ids and errors are sorted, so the
    /// order policies were evaluated in does not show (Cedar's errors are unordered).
    pub(crate) fn combine(
        mut permits: Vec<String>,
        mut forbids: Vec<String>,
        mut errors: Vec<String>,
        mode: Mode,
    ) -> Self {
        errors.sort();
        let (allowed, policies) = if !forbids.is_empty() {
            forbids.sort();
            (false, forbids)
        } else if !permits.is_empty() && errors.is_empty() {
            permits.sort();
            (true, permits)
        } else {
            // With errors, the permits Cedar found do not determine a deny; the errors do.
            (false, Vec::new())
        };
        Self {
            allowed,
            policies,
            errors,
            mode,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

impl Authorizer {
    /// An authorizer enforcing `enforced`, and recording `dry_run`'s decisions beside it.
    pub fn new(enforced: PolicySet, dry_run: Option<PolicySet>) -> Self {
        Self { enforced, dry_run }
    }

    /// The enforced decision for `request`.
    pub fn decide(&self, request: &AuthzRequest) -> Decision {
        self.enforced.decide(request, Mode::Enforce)
    }

    /// The dry-run set's decision for `request`, if there is a dry-run set. Never enforce it.
    pub fn decide_dry_run(&self, request: &AuthzRequest) -> Option<Decision> {
        self.dry_run
            .as_ref()
            .map(|set| set.decide(request, Mode::DryRun))
    }

    /// The enforced policy set.
    pub fn enforced(&self) -> &PolicySet {
        &self.enforced
    }

    /// The dry-run policy set, if any.
    pub fn dry_run(&self) -> Option<&PolicySet> {
        self.dry_run.as_ref()
    }
}

/// Evaluates one Cedar request against one (sub-)set of policies, failing closed.
pub(crate) fn evaluate(
    request: &Request,
    policies: &cedar_policy::PolicySet,
    entities: &cedar_policy::Entities,
    mode: Mode,
) -> Decision {
    if policies.is_empty() {
        // Nothing can permit, forbid or error.
        return Decision::no_policy_permits(mode);
    }
    let response = CedarAuthorizer::new().is_authorized(request, policies, entities);
    Decision::from_response(&response, mode)
}

/// Shared, immutable state; cheap to clone into tasks.
pub type SharedAuthorizer = Arc<Authorizer>;

#[cfg(test)]
mod tests;
