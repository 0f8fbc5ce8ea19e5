"""The target: find, check, pull and verify one rank's weights from seeds.

- `policy`: candidates, rounds, fallback to other layouts, bounds (`pull_weights`,
  `pull_into`, `PullOptions`);
- `choice`: which seeds first (least loaded, ties at random; the pipelined tree's plan);
- `pipeline`: the pipelined cascade (a target serving its verified tensors while it pulls: `PipelineSeed`);
- `waiting`: waiting for a seed on the metadata server's watch, or polling;
- `candidate`: one seed becoming a candidate (record fetched and checked, lease);
- `striped` (+ `stripes`): a same-layout pull over one or more seeds;
- `reshard` (+ `reshard_plan`): a pull from a seed instance of another TP layout;
- `verify`: the one verify rule (`VerifyMode`, `expect`);
- `progress`: the line a long pull logs every few seconds (`PullProgress`);
- `report`: what a pull reports (`PullReport`).
"""

from sglang_mx.target.pipeline import PipelineSeed
from sglang_mx.target.policy import PullOptions, pull_into, pull_weights
from sglang_mx.target.report import PullReport
from sglang_mx.target.verify import Verifier, VerifyMode, digest_verifier

__all__ = ["PipelineSeed", "PullOptions", "PullReport", "Verifier", "VerifyMode", "digest_verifier", "pull_into", "pull_weights"]
