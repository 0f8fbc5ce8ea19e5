"""Moving bytes: plans (pure) and the Mooncake engine that executes them."""

from sglang_mx.transfer.engine import MooncakeEngine
from sglang_mx.transfer.plan import Read, TransferPlan, build_plan, coalesce_ranges, merge_reads

__all__ = ["MooncakeEngine", "Read", "TransferPlan", "build_plan", "coalesce_ranges", "merge_reads"]
