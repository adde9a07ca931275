"""Several daemons on one database: who each one is, and fleet-wide leases."""

from memos.services.fleet.instance import Instance, owner_gone
from memos.services.fleet.leases import Leases

__all__ = ["Instance", "Leases", "owner_gone"]
