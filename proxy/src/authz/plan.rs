//! Plans: what one (principal, action, resource) triple is decided with, worked out once.
//!
//! A pair's slice (see `index.rs`) holds every policy whose principal and resource scopes can
//! match. For one action of that pair, a plan sorts them four ways, each provably without
//! changing Cedar's answer, reasons or errors:
//!
//! - *Out*: the action scope cannot match (`action == A` for another action, `action in [..]`
//!   naming neither the action nor one of its groups). Cedar's policy condition is
//!   `principal-scope && action-scope && resource-scope && conditions`; scopes never error and
//!   `&&` short-circuits, so such a policy is false without its conditions being evaluated.
//! - *Settled*: the policy never reads `context`. Everything else it can read — principal,
//!   action, resource and the pair's entity store — is fixed for the triple, and Cedar's
//!   evaluation is a pure function of those, so its outcome (satisfied, not, or the same
//!   error) is the same for every request of the triple. It is evaluated once, here.
//! - *Compiled*: the policy reads `context`, but its conditions are all shapes `compiled.rs`
//!   evaluates natively (`context.path like "…"`, `==` on context strings, `&&`, …), which
//!   cannot error. Its principal and resource scopes are checked once here (the index
//!   over-approximates them, see `index.rs`); per request only its condition is evaluated,
//!   against the request's fields, with no Cedar `Context` built.
//! - *Per request*: the rest, evaluated by Cedar on each decision, with a context holding only
//!   the attributes they mention ([`ContextNeeds`]). Should that evaluation report any error,
//!   it is redone with the full context, so error texts are exactly Cedar's.
//!
//! Whether a policy reads `context`, and which attributes, comes from its JSON form (EST),
//! computed once per policy when the set is loaded ([`PolicyFacts`]): `context` may appear
//! only as the left side of `.attr` or `has attr`; any other use, or a form this scan does not
//! know, counts as "reads all of it". Attribute names are collected from every string in the
//! policy, which can only over-approximate.

use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Entities, EntityUid, Policy, PrincipalConstraint, Request,
    ResourceConstraint, Response,
};
use serde_json::Value;

use super::Decision;
use super::Mode;
use super::compiled::Condition;
use super::request::{AuthzRequest, EntityTypes};

/// Which context attributes a set of policies can observe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ContextNeeds {
    /// `context` is used other than through `.attr` / `has attr`: build all of it.
    pub(crate) all: bool,
    pub(crate) method: bool,
    pub(crate) path: bool,
    pub(crate) host: bool,
    pub(crate) source_ip: bool,
    pub(crate) tls: bool,
}

/// What one policy does with `context`, from its JSON form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContextUse {
    /// `context` appears at all.
    pub(crate) reads: bool,
    /// The attributes it may observe (meaningful when `reads`).
    pub(crate) needs: ContextNeeds,
}

/// What the loader works out once per policy, so that building a plan reads no policy text.
#[derive(Debug, Clone)]
pub(crate) struct PolicyFacts {
    /// What it does with `context`.
    pub(crate) use_: ContextUse,
    /// Its conditions, natively, when they are all compiled shapes (see `compiled.rs`).
    pub(crate) condition: Option<Arc<Condition>>,
}

/// A policy whose conditions are evaluated natively, and whose scopes match the triple.
#[derive(Debug)]
struct CompiledPolicy {
    id: String,
    permit: bool,
    condition: Arc<Condition>,
}

/// The decision procedure for one (principal, action, resource) triple.
#[derive(Debug)]
pub(crate) struct Plan {
    action: EntityUid,
    /// Settled policies that are satisfied, by effect.
    permits: Vec<String>,
    forbids: Vec<String>,
    /// Errors of settled policies.
    errors: Vec<String>,
    /// Compiled policies, in set order.
    compiled: Vec<CompiledPolicy>,
    /// Per-request policies; empty when every policy is settled or out.
    dynamic: cedar_policy::PolicySet,
    needs: ContextNeeds,
}

/// The policies of a pair a plan is built from.
pub(crate) struct PlanInput<'a> {
    pub(crate) principal: &'a EntityUid,
    pub(crate) resource: &'a EntityUid,
    pub(crate) entities: &'a Entities,
    /// Each candidate policy with what the loader worked out about it, in set order.
    pub(crate) policies: Vec<(&'a Policy, &'a PolicyFacts)>,
}

impl ContextNeeds {
    /// Everything: the context the proxy always could build.
    pub(crate) const ALL: ContextNeeds = ContextNeeds {
        all: true,
        method: true,
        path: true,
        host: true,
        source_ip: true,
        tls: true,
    };

    /// Whether the attribute `name` is built.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.all
            || match name {
                "method" => self.method,
                "path" => self.path,
                "host" => self.host,
                "sourceIp" => self.source_ip,
                "tls" => self.tls,
                _ => false,
            }
    }

    fn union(self, other: ContextNeeds) -> ContextNeeds {
        ContextNeeds {
            all: self.all || other.all,
            method: self.method || other.method,
            path: self.path || other.path,
            host: self.host || other.host,
            source_ip: self.source_ip || other.source_ip,
            tls: self.tls || other.tls,
        }
    }

    fn mention(&mut self, name: &str) {
        match name {
            "method" => self.method = true,
            "path" => self.path = true,
            "host" => self.host = true,
            "sourceIp" => self.source_ip = true,
            "tls" => self.tls = true,
            _ => {}
        }
    }
}

impl ContextUse {
    /// What `policy` does with `context`; "reads all of it" when its JSON form is unavailable.
    #[cfg(test)]
    pub(crate) fn of(policy: &Policy) -> Self {
        PolicyFacts::of(policy).use_
    }
}

impl PolicyFacts {
    /// Everything about `policy` a plan needs, from one pass over its JSON form (which
    /// re-parses the policy's text: tens of microseconds, so once, at load). Without a JSON
    /// form: reads all of `context`, not compiled.
    pub(crate) fn of(policy: &Policy) -> Self {
        match policy.to_json() {
            Ok(json) => {
                let mut use_ = ContextUse {
                    reads: false,
                    needs: ContextNeeds::default(),
                };
                scan(&json, &mut use_);
                let condition = if use_.reads {
                    Condition::of_policy(&json).map(Arc::new)
                } else {
                    // Settled per triple anyway; nothing to gain.
                    None
                };
                PolicyFacts { use_, condition }
            }
            Err(_) => PolicyFacts {
                use_: ContextUse {
                    reads: true,
                    needs: ContextNeeds::ALL,
                },
                condition: None,
            },
        }
    }
}

impl Plan {
    /// Sorts `input`'s policies for `action` (see the module doc) and evaluates the settled
    /// ones. `action` must be the action entity `request` names.
    pub(crate) fn build(input: &PlanInput<'_>, action: &EntityUid) -> Result<Self, String> {
        let ancestors: Vec<&EntityUid> = input
            .entities
            .ancestors(action)
            .map(Iterator::collect)
            .unwrap_or_default();
        let mut settled_permits = Vec::new();
        let mut settled_forbids = Vec::new();
        let mut dynamic = Vec::new();
        let mut compiled = Vec::new();
        let mut needs = ContextNeeds::default();
        for (policy, facts) in &input.policies {
            if !action_scope_can_match(policy.action_constraint(), action, &ancestors) {
                continue;
            }
            if let Some(condition) = &facts.condition {
                // Cedar's condition is `scopes && conditions`: with a false scope the policy
                // is false, without an error (scopes never error).
                if principal_scope_holds(
                    policy.principal_constraint(),
                    input.principal,
                    input.entities,
                ) && resource_scope_holds(
                    policy.resource_constraint(),
                    input.resource,
                    input.entities,
                ) {
                    compiled.push(CompiledPolicy {
                        id: policy.id().to_string(),
                        permit: policy.effect() == cedar_policy::Effect::Permit,
                        condition: Arc::clone(condition),
                    });
                }
            } else if facts.use_.reads {
                needs = needs.union(facts.use_.needs);
                dynamic.push((*policy).clone());
            } else if policy.effect() == cedar_policy::Effect::Permit {
                settled_permits.push((*policy).clone());
            } else {
                settled_forbids.push((*policy).clone());
            }
        }
        // Settled policies never read `context`, so any context gives their outcome.
        let request = Request::new(
            input.principal.clone(),
            action.clone(),
            input.resource.clone(),
            cedar_policy::Context::empty(),
            None,
        )
        .map_err(|e| format!("cannot build the request: {e}"))?;
        let mut errors = Vec::new();
        let permits = settle(settled_permits, &request, input.entities, &mut errors)?;
        let forbids = settle(settled_forbids, &request, input.entities, &mut errors)?;
        Ok(Self {
            action: action.clone(),
            permits,
            forbids,
            errors,
            compiled,
            dynamic: cedar_policy::PolicySet::from_policies(dynamic)
                .map_err(|e| format!("cannot build the policy slice: {e}"))?,
            needs,
        })
    }

    /// The decision for `request` (whose principal and resource are the plan's pair).
    pub(crate) fn decide(
        &self,
        request: &AuthzRequest,
        principal: &EntityUid,
        resource: &EntityUid,
        entities: &Entities,
        types: &EntityTypes,
        mode: Mode,
    ) -> Decision {
        let mut permits = self.permits.clone();
        let mut forbids = self.forbids.clone();
        let mut errors = self.errors.clone();
        for policy in &self.compiled {
            if policy.condition.eval(request) {
                let ids = if policy.permit {
                    &mut permits
                } else {
                    &mut forbids
                };
                ids.push(policy.id.clone());
            }
        }
        if self.dynamic.is_empty() {
            return Decision::combine(permits, forbids, errors, mode);
        }
        let evaluate = |needs: &ContextNeeds| -> Result<Response, String> {
            let context = request.context(&types.ips, needs)?;
            let cedar = Request::new(
                principal.clone(),
                self.action.clone(),
                resource.clone(),
                context,
                None,
            )
            .map_err(|e| format!("cannot build the request: {e}"))?;
            Ok(cedar_policy::Authorizer::new().is_authorized(&cedar, &self.dynamic, entities))
        };
        let mut response = evaluate(&self.needs);
        if !self.needs.all
            && response
                .as_ref()
                .map_or(true, |r| r.diagnostics().errors().next().is_some())
        {
            // Errors are rare and fail closed anyway; redo with the full context so that their
            // text is exactly what Cedar says for the full request.
            response = evaluate(&ContextNeeds::ALL);
        }
        let response = match response {
            Ok(response) => response,
            Err(e) => return Decision::failed(mode, e),
        };
        let diagnostics = response.diagnostics();
        errors.extend(diagnostics.errors().map(ToString::to_string));
        // Cedar's reasons are the satisfied permits of an allow, the satisfied forbids of a deny.
        let reasons = diagnostics.reason().map(ToString::to_string);
        match response.decision() {
            cedar_policy::Decision::Allow => permits.extend(reasons),
            cedar_policy::Decision::Deny => forbids.extend(reasons),
        }
        Decision::combine(permits, forbids, errors, mode)
    }
}

/// Evaluates policies of one effect together; returns the satisfied ones' ids, and appends
/// the errors.
fn settle(
    policies: Vec<Policy>,
    request: &Request,
    entities: &Entities,
    errors: &mut Vec<String>,
) -> Result<Vec<String>, String> {
    if policies.is_empty() {
        return Ok(Vec::new());
    }
    let set = cedar_policy::PolicySet::from_policies(policies)
        .map_err(|e| format!("cannot build the policy slice: {e}"))?;
    let response = cedar_policy::Authorizer::new().is_authorized(request, &set, entities);
    let diagnostics = response.diagnostics();
    errors.extend(diagnostics.errors().map(ToString::to_string));
    // All permits: an allow's reasons are the satisfied ones, a deny has none. All forbids:
    // always a deny, whose reasons are the satisfied ones.
    Ok(diagnostics.reason().map(ToString::to_string).collect())
}

/// Whether a principal scope is true for `principal` (with the pair's entity store).
fn principal_scope_holds(
    constraint: PrincipalConstraint,
    principal: &EntityUid,
    entities: &Entities,
) -> bool {
    match constraint {
        PrincipalConstraint::Any => true,
        PrincipalConstraint::Eq(uid) => &uid == principal,
        PrincipalConstraint::In(uid) => is_in(principal, &uid, entities),
        PrincipalConstraint::Is(ty) => principal.type_name() == &ty,
        PrincipalConstraint::IsIn(ty, uid) => {
            principal.type_name() == &ty && is_in(principal, &uid, entities)
        }
    }
}

/// Whether a resource scope is true for `resource` (with the pair's entity store).
fn resource_scope_holds(
    constraint: ResourceConstraint,
    resource: &EntityUid,
    entities: &Entities,
) -> bool {
    match constraint {
        ResourceConstraint::Any => true,
        ResourceConstraint::Eq(uid) => &uid == resource,
        ResourceConstraint::In(uid) => is_in(resource, &uid, entities),
        ResourceConstraint::Is(ty) => resource.type_name() == &ty,
        ResourceConstraint::IsIn(ty, uid) => {
            resource.type_name() == &ty && is_in(resource, &uid, entities)
        }
    }
}

/// Cedar's `entity in group`: equal, or `group` is among its ancestors in the store (an
/// entity the store lacks has none).
fn is_in(entity: &EntityUid, group: &EntityUid, entities: &Entities) -> bool {
    entity == group
        || entities
            .ancestors(entity)
            .is_some_and(|mut ancestors| ancestors.any(|a| a == group))
}

/// Whether a policy's action scope can be true for `action` (with `ancestors`, its groups).
fn action_scope_can_match(
    constraint: ActionConstraint,
    action: &EntityUid,
    ancestors: &[&EntityUid],
) -> bool {
    let is_or_in = |uid: &EntityUid| uid == action || ancestors.contains(&uid);
    match constraint {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => &uid == action,
        ActionConstraint::In(uids) => uids.iter().any(is_or_in),
    }
}

/// Walks a policy's JSON form, recording what it does with `context`.
fn scan(value: &Value, use_: &mut ContextUse) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                use_.needs.mention(key);
                if key == "Var" {
                    if child.as_str() == Some("context") {
                        // A bare `context` (not under `.attr` / `has attr`): all of it.
                        use_.reads = true;
                        use_.needs.all = true;
                    }
                    continue;
                }
                if (key == "." || key == "has")
                    && let Some(access) = child.as_object()
                    && access
                        .get("left")
                        .and_then(|l| l.get("Var"))
                        .and_then(Value::as_str)
                        == Some("context")
                {
                    use_.reads = true;
                    match access.get("attr").and_then(Value::as_str) {
                        Some(attr) => use_.needs.mention(attr),
                        None => use_.needs.all = true,
                    }
                    for (k, v) in access {
                        use_.needs.mention(k);
                        if k != "left" {
                            scan(v, use_);
                        }
                    }
                    continue;
                }
                scan(child, use_);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| scan(v, use_)),
        Value::String(s) => use_.needs.mention(s),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The plan of one action of a pair, built on first use (a failure is kept, and denies).
pub(crate) type PlanCell = std::sync::OnceLock<Result<Plan, String>>;
