"""The ranking task every system answers: a user's history, candidates, one target.

The record sits at the bottom of the package layers because every layer above reads
it: the data layer builds, writes and checks task files (`starrec.data.tasks`), the CST,
the baselines, the teacher and the student answer tasks, and the evaluation scores them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# scenarios whose history is the last `starrec.data.tasks.SHORT_HISTORY` items only, so
# its length is not the cutoff
SHORT_SCENARIOS = ("user_cold", "short_term")


@dataclass
class Task:
    """One ranking request. `candidates` are in presented order (the task file's; an LLM
    may be shown them reordered, `starrec.cst.ranker.present`); `target` is among them.

    `cutoff` is the 0-based position of the target in the user's full time-ordered
    sequence, and `cutoff_time` its timestamp: every cut of the data for this task uses
    them, because the history may be shortened (scenarios) and an item may repeat, so
    neither the history's length nor its last item says where the target was. Files
    written before cutoffs existed are read with `cutoff = len(history)` where the history
    is the full prefix, and None (found from the data, `starrec.data.splits.task_cutoff`)
    where it was shortened.
    """

    task_id: str
    user_id: str
    scenario: str
    history: list[str]
    candidates: list[str]
    target: str
    split: str = "test"
    cutoff: int | None = None
    cutoff_time: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cutoff is None and self.scenario not in SHORT_SCENARIOS:
            self.cutoff = len(self.history)

    def to_json(self) -> str:
        record = asdict(self)
        if not record["extra"]:
            del record["extra"]
        time = record["cutoff_time"]
        if isinstance(time, float) and time.is_integer():
            record["cutoff_time"] = int(time)  # epoch seconds read as written
        return json.dumps(record, ensure_ascii=False)

    @property
    def target_index(self) -> int:
        return self.candidates.index(self.target)
