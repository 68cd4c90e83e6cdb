//! Choosing among candidates: what branches forward and what the root picks.

use std::collections::BTreeSet;

use crate::{Candidate, PlacementError, Request};

fn admissible(request: &Request, candidate: &Candidate) -> bool {
    candidate.free_bytes >= request.bytes
        && !request.excluded_hosts.contains(&candidate.bucket.host)
        && request.site.as_ref().is_none_or(|site| candidate.site.as_ref() == Some(site))
}

fn by_score(request: &Request, candidates: &mut [Candidate]) {
    candidates.sort_by(|a, b| {
        b.score(request.bytes).total_cmp(&a.score(request.bytes)).then_with(|| a.bucket.cmp(&b.bucket))
    });
}

/// Picks `request.count` buckets: greedily by score, skipping any that would
/// break distinctness.
pub fn choose(request: &Request, candidates: &[Candidate]) -> Result<Vec<Candidate>, PlacementError> {
    let mut pool: Vec<Candidate> = candidates.iter().filter(|c| admissible(request, c)).cloned().collect();
    by_score(request, &mut pool);
    let mut chosen: Vec<Candidate> = Vec::with_capacity(request.count);
    let mut hosts = BTreeSet::new();
    let mut domains = BTreeSet::new();
    let mut buckets = BTreeSet::new();
    for candidate in pool {
        if chosen.len() == request.count {
            break;
        }
        if !buckets.insert(candidate.bucket)
            || (request.distinct_hosts && hosts.contains(&candidate.bucket.host))
            || (request.distinct_fault_domains && domains.contains(&candidate.fault_domain))
        {
            continue;
        }
        hosts.insert(candidate.bucket.host);
        domains.insert(candidate.fault_domain.clone());
        chosen.push(candidate);
    }
    if chosen.len() < request.count {
        return Err(PlacementError::NotEnough { wanted: request.count, found: chosen.len() });
    }
    Ok(chosen)
}

/// What a branch forwards: the best admissible candidates, at most `keep`:
/// first the best of each fault domain, then the best of each remaining
/// host, then the rest by score, so the root can still satisfy distinctness
/// from a short list.
pub fn shortlist(request: &Request, candidates: Vec<Candidate>, keep: usize) -> Vec<Candidate> {
    let mut pool: Vec<Candidate> = candidates.into_iter().filter(|c| admissible(request, c)).collect();
    by_score(request, &mut pool);
    let mut seen_domains = BTreeSet::new();
    let mut seen_hosts = BTreeSet::new();
    let (mut by_domain, mut by_host, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for candidate in pool {
        if seen_domains.insert(candidate.fault_domain.clone()) {
            seen_hosts.insert(candidate.bucket.host);
            by_domain.push(candidate);
        } else if seen_hosts.insert(candidate.bucket.host) {
            by_host.push(candidate);
        } else {
            rest.push(candidate);
        }
    }
    by_domain.extend(by_host);
    by_domain.extend(rest);
    by_domain.truncate(keep);
    by_domain
}

/// Checks a placement against its request; says which constraint fails.
pub fn check(request: &Request, chosen: &[Candidate]) -> Result<(), String> {
    if chosen.len() != request.count {
        return Err(format!("{} buckets for a request of {}", chosen.len(), request.count));
    }
    let mut hosts = BTreeSet::new();
    let mut domains = BTreeSet::new();
    let mut buckets = BTreeSet::new();
    for candidate in chosen {
        if !admissible(request, candidate) {
            return Err(format!("{:?} does not satisfy capacity, site or exclusion", candidate.bucket));
        }
        if !buckets.insert(candidate.bucket) {
            return Err(format!("{:?} chosen twice", candidate.bucket));
        }
        if request.distinct_hosts && !hosts.insert(candidate.bucket.host) {
            return Err(format!("host {} chosen twice", candidate.bucket.host));
        }
        if request.distinct_fault_domains && !domains.insert(candidate.fault_domain.clone()) {
            return Err(format!("fault domain {:?} chosen twice", candidate.fault_domain));
        }
    }
    Ok(())
}
