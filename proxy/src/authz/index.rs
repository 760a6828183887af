//! The scope index: which policies can possibly apply to a (principal, resource) pair.
//!
//! A Cedar policy is `principal-scope && action-scope && resource-scope && conditions`, and
//! `&&` short-circuits: a policy whose principal or resource scope is false for a request is
//! false without evaluating its conditions — it can neither permit, forbid nor error. So
//! leaving it out changes nothing in Cedar's answer, its reasons or its errors.
//!
//! A scope `== E`, `in E` or `is T in E` can only be true when `E` is the request's entity or
//! one of its ancestors (`in` is reflexive); `is T` and an unconstrained scope can be true for
//! anyone. Each policy goes into exactly one bucket keyed by (principal key, resource key),
//! where a key is `E` or "any". A request's candidates are the buckets of
//! `{principal, its namespace, its trust domain, any} x {resource, ..., any}`: at most 16
//! lookups, whatever the size of the set. Keying `==` by `E` as well as `in` over-approximates
//! (`principal == Namespace::"x"` is looked at for members of `x`), which is harmless: Cedar
//! still evaluates the candidates.
//!
//! The candidates for a pair are kept with the pair's entity store, once, and cached
//! (bounded) for the life of this policy set; each action of the pair gets its own plan
//! (`plan.rs`), built on first use.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cedar_policy::{Entities, EntityUid, Policy, PrincipalConstraint, ResourceConstraint};
use meshward_identity::SpiffeId;

use super::plan::PlanCell;
use super::request::{Action, WorkloadPlace};

/// Most (principal, resource) pairs cached per policy set; then the cache starts over.
///
/// A sidecar decides for one resource (itself) and as many principals as call it, so this is
/// roughly "callers per workload"; a full cache is cleared rather than evicted piecemeal,
/// which bounds memory at the cost of rebuilding hot pairs once.
pub(crate) const SLICE_CACHE_CAPACITY: usize = 4096;

/// Policies bucketed by principal scope key, then resource scope key.
#[derive(Debug, Default)]
pub(crate) struct ScopeIndex {
    by_principal: HashMap<EntityUid, ResourceBuckets>,
    any_principal: ResourceBuckets,
}

#[derive(Debug, Default)]
struct ResourceBuckets {
    by_resource: HashMap<EntityUid, Vec<usize>>,
    any_resource: Vec<usize>,
}

/// What one (principal, resource) pair is decided against.
#[derive(Debug)]
pub(crate) struct Slice {
    pub(crate) principal: EntityUid,
    pub(crate) resource: EntityUid,
    /// Positions of the policies whose scopes can match, ascending.
    pub(crate) candidates: Vec<usize>,
    pub(crate) entities: Entities,
    /// One plan per action, in [`Action::ALL`] order.
    plans: [PlanCell; Action::ALL.len()],
}

/// A bounded cache of slices by principal, then resource (nested, so a hit allocates nothing).
#[derive(Debug, Default)]
pub(crate) struct SliceCache {
    slices: RwLock<CacheMap>,
}

#[derive(Debug, Default)]
struct CacheMap {
    by_principal: HashMap<SpiffeId, HashMap<SpiffeId, Arc<Slice>>>,
    len: usize,
}

impl ScopeIndex {
    /// Buckets every policy (by position in `policies`).
    pub(crate) fn build(policies: &[Policy]) -> Self {
        let mut index = Self::default();
        for (i, policy) in policies.iter().enumerate() {
            let buckets = match principal_key(policy.principal_constraint()) {
                Some(key) => index.by_principal.entry(key).or_default(),
                None => &mut index.any_principal,
            };
            match resource_key(policy.resource_constraint()) {
                Some(key) => buckets.by_resource.entry(key).or_default().push(i),
                None => buckets.any_resource.push(i),
            }
        }
        index
    }

    /// Positions of the policies whose scopes can match `principal` and `resource`, ascending.
    pub(crate) fn candidates(
        &self,
        principal: &WorkloadPlace,
        resource: &WorkloadPlace,
    ) -> Vec<usize> {
        let mut out = Vec::new();
        let principal_buckets = keys(principal)
            .filter_map(|k| self.by_principal.get(k))
            .chain(std::iter::once(&self.any_principal));
        for buckets in principal_buckets {
            for key in keys(resource) {
                if let Some(bucket) = buckets.by_resource.get(key) {
                    out.extend_from_slice(bucket);
                }
            }
            out.extend_from_slice(&buckets.any_resource);
        }
        // Each policy is in exactly one bucket, and a workload's keys are distinct, so there
        // are no duplicates; sorting keeps Cedar's input in file order.
        out.sort_unstable();
        out
    }

    /// How many (principal key, resource key) buckets hold policies.
    pub(crate) fn bucket_count(&self) -> usize {
        let count =
            |b: &ResourceBuckets| b.by_resource.len() + usize::from(!b.any_resource.is_empty());
        self.by_principal.values().map(count).sum::<usize>() + count(&self.any_principal)
    }
}

impl Slice {
    /// A slice with no plan built yet.
    pub(crate) fn new(
        principal: EntityUid,
        resource: EntityUid,
        candidates: Vec<usize>,
        entities: Entities,
    ) -> Self {
        Self {
            principal,
            resource,
            candidates,
            entities,
            plans: std::array::from_fn(|_| PlanCell::new()),
        }
    }

    /// The plan cell of `action`.
    pub(crate) fn plan(&self, action: Action) -> Option<&PlanCell> {
        let position = Action::ALL.iter().position(|a| *a == action)?;
        self.plans.get(position)
    }
}

impl SliceCache {
    /// The cached slice for the pair, or `build`'s result (cached when it succeeds).
    pub(crate) fn get_or_build<E>(
        &self,
        principal: &SpiffeId,
        resource: &SpiffeId,
        build: impl FnOnce() -> Result<Slice, E>,
    ) -> Result<Arc<Slice>, E> {
        {
            // A poisoned lock only means another thread panicked mid-insert; the map is
            // still a valid map of complete slices.
            let slices = self.slices.read().unwrap_or_else(|e| e.into_inner());
            if let Some(slice) = slices
                .by_principal
                .get(principal)
                .and_then(|by_resource| by_resource.get(resource))
            {
                return Ok(Arc::clone(slice));
            }
        }
        let slice = Arc::new(build()?);
        let mut slices = self.slices.write().unwrap_or_else(|e| e.into_inner());
        if slices.len >= SLICE_CACHE_CAPACITY {
            *slices = CacheMap::default();
        }
        let previous = slices
            .by_principal
            .entry(principal.clone())
            .or_default()
            .insert(resource.clone(), Arc::clone(&slice));
        if previous.is_none() {
            slices.len += 1;
        }
        Ok(slice)
    }

    /// How many pairs are cached.
    pub(crate) fn len(&self) -> usize {
        self.slices.read().unwrap_or_else(|e| e.into_inner()).len
    }
}

/// The request entity and its ancestors: the only scope entities that can match it.
fn keys(place: &WorkloadPlace) -> impl Iterator<Item = &EntityUid> {
    std::iter::once(&place.uid)
        .chain(place.namespace.as_ref())
        .chain(std::iter::once(&place.trust_domain))
}

/// The entity a principal scope names, or `None` when it can match any principal.
fn principal_key(constraint: PrincipalConstraint) -> Option<EntityUid> {
    match constraint {
        PrincipalConstraint::Any | PrincipalConstraint::Is(_) => None,
        PrincipalConstraint::Eq(uid)
        | PrincipalConstraint::In(uid)
        | PrincipalConstraint::IsIn(_, uid) => Some(uid),
    }
}

/// The entity a resource scope names, or `None` when it can match any resource.
fn resource_key(constraint: ResourceConstraint) -> Option<EntityUid> {
    match constraint {
        ResourceConstraint::Any | ResourceConstraint::Is(_) => None,
        ResourceConstraint::Eq(uid)
        | ResourceConstraint::In(uid)
        | ResourceConstraint::IsIn(_, uid) => Some(uid),
    }
}
