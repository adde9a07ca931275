"""A cube's lifecycle policy: budgets, TTL, retention, fusion and eviction (owner sets it)."""

from __future__ import annotations

from fastapi import APIRouter

from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.openapi import errors
from memos.api.schemas_lifecycle import PolicyHistory, PolicyOut, PolicyUpdate

router = APIRouter(prefix="/v1/cubes", tags=["lifecycle"])


@router.get("/{cube_id}/policy", response_model=PolicyOut)
def get_policy(cube_id: str, daemon: DaemonDep, principal: PrincipalDep) -> PolicyOut:
    """The policy in force (reader+): the owner's fields over the daemon's defaults."""
    return PolicyOut.of(daemon.policies.get(principal, cube_id))


@router.put(
    "/{cube_id}/policy",
    response_model=PolicyOut,
    responses=errors(
        {
            403: "`forbidden`: only the owner may change the policy",
            422: "`invalid_policy`: a field out of range or an unknown eviction policy",
        }
    ),
)
def put_policy(
    cube_id: str, body: PolicyUpdate, daemon: DaemonDep, principal: PrincipalDep
) -> PolicyOut:
    """Set the fields given (owner only); the others keep their value. Every change is a new
    version, listed by `GET .../policy/history`."""
    return PolicyOut.of(daemon.policies.set(principal, cube_id, body.changes()))


@router.get("/{cube_id}/policy/history", response_model=PolicyHistory)
def policy_history(cube_id: str, daemon: DaemonDep, principal: PrincipalDep) -> PolicyHistory:
    """Every version the owner set, oldest first (reader+)."""
    views = daemon.policies.history(principal, cube_id)
    return PolicyHistory(items=[PolicyOut.of(v) for v in views])
