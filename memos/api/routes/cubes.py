from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.openapi import errors
from memos.api.schemas import CubeCreate, CubeList, CubeOut, GrantCreate, GrantOut
from memos.api.schemas_access import GrantEntry, GrantList

router = APIRouter(prefix="/v1/cubes", tags=["cubes"])

Limit = Annotated[int, Query(ge=1, le=500)]


@router.post(
    "",
    status_code=201,
    response_model=CubeOut,
    responses=errors({409: "`cube_exists`: the key's user has a cube of that name"}),
)
def create_cube(body: CubeCreate, daemon: DaemonDep, principal: PrincipalDep) -> CubeOut:
    return CubeOut.model_validate(daemon.cubes.create(principal, body.name, body.description))


@router.get("", response_model=CubeList)
def list_cubes(
    daemon: DaemonDep, principal: PrincipalDep, limit: Limit = 50, cursor: str | None = None
) -> CubeList:
    page = daemon.cubes.visible(principal, limit, cursor)
    return CubeList(
        items=[CubeOut.model_validate(c) for c in page.items], next_cursor=page.next_cursor
    )


@router.get("/{cube_id}", response_model=CubeOut)
def get_cube(cube_id: str, daemon: DaemonDep, principal: PrincipalDep) -> CubeOut:
    return CubeOut.model_validate(daemon.cubes.get(principal, cube_id))


@router.delete("/{cube_id}", status_code=204)
def delete_cube(cube_id: str, daemon: DaemonDep, principal: PrincipalDep) -> Response:
    daemon.cubes.delete(principal, cube_id)
    return Response(status_code=204)


@router.post("/{cube_id}/grants", status_code=201, response_model=GrantOut)
def grant(cube_id: str, body: GrantCreate, daemon: DaemonDep, principal: PrincipalDep) -> GrantOut:
    return GrantOut(**daemon.cubes.grant(principal, cube_id, body.user_id, body.role))


@router.get("/{cube_id}/grants", response_model=GrantList)
def list_grants(
    cube_id: str,
    daemon: DaemonDep,
    principal: PrincipalDep,
    limit: Limit = 50,
    cursor: str | None = None,
) -> GrantList:
    """Who else may use the cube (owner only), oldest grant first."""
    page = daemon.cubes.grants(principal, cube_id, limit, cursor)
    return GrantList(
        items=[GrantEntry.model_validate(g) for g in page.items], next_cursor=page.next_cursor
    )


@router.delete("/{cube_id}/grants/{user_id}", status_code=204)
def revoke_grant(
    cube_id: str, user_id: str, daemon: DaemonDep, principal: PrincipalDep
) -> Response:
    """Owner only; the user's next request on the cube gets 404. No such grant: 404
    `grant_not_found`."""
    daemon.cubes.revoke(principal, cube_id, user_id)
    return Response(status_code=204)
