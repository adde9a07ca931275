"""Several daemons on one database: who each one is, and fleet-wide leases."""

from memos.services.fleet.instance import Instance, other_owner_gone, owner_gone
from memos.services.fleet.leases import Leases

__all__ = ["Instance", "Leases", "other_owner_gone", "owner_gone"]
