"""The Flower strategy: FedSGD on the shared encoder, tasks sampled by partition id.

Flower's node ids are random per run and replies arrive in any order, so the
strategy samples *partition ids* from a generator seeded per round and aggregates
the replies sorted by partition id: the same seed gives the same encoder. The math
is :class:`strategies.fedsgd.EncoderAggregator`; this class only moves messages.

Message protocol (what the ClientApp reads): content["encoder"] is the encoder's
ArrayRecord, content["config"] a ConfigRecord with "run-config" (the resolved run
configuration as JSON), "server-round", "warm-start" and "partition-id" (the task meant: a
node may serve several). Replies carry
content["metrics"] (with "partition-id") and, outside warm-start rounds,
content["encoder-grad"], the task's encoder gradient.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.fedsgd import EncoderAggregator, round_row
from strategies.sampling import sample_round


class FederationError(RuntimeError):
    """A client failed or the federation could not proceed."""


class FedSGDStrategy(Strategy):
    def __init__(self, aggregator: EncoderAggregator, *, node_of_partition: dict[int, int], run_config_json: str,
                 tasks_per_round: int, warm_start_rounds: int, seed: int, dp_enabled: bool = False,
                 max_failed_fraction: float = 0.0, on_round: Callable[[dict], None] | None = None,
                 first_round: int = 1):
        if not 0.0 <= max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be in [0, 1]; got {max_failed_fraction}")
        self.aggregator = aggregator
        self.node_of_partition = node_of_partition
        self.partition_of_node = {node: pid for pid, node in node_of_partition.items()}
        self.max_failed_fraction = max_failed_fraction
        self._sampled: list[int] = []
        self.num_tasks = len(node_of_partition)
        self.run_config_json = run_config_json
        self.tasks_per_round = tasks_per_round
        self.warm_start_rounds = warm_start_rounds
        self.seed = seed
        self.dp_enabled = dp_enabled
        self.on_round = on_round
        self._round_started = 0.0
        # Flower's loop counts from 1; a resumed run's rounds continue after its checkpoint
        self.round_offset = first_round - 1

    def is_warm_start(self, server_round: int) -> bool:
        return server_round <= self.warm_start_rounds

    def sample(self, server_round: int) -> list[int]:
        return sample_round(self.num_tasks, self.tasks_per_round, self.seed, server_round,
                            self.is_warm_start(server_round), self.dp_enabled)

    def summary(self) -> None:  # Flower calls this at start; our progress lines say enough
        pass

    _sent: tuple[tuple[Message, int], ...] = ()  # this round's train messages and their partitions

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled task, naming its partition: a node may serve several tasks."""
        server_round += self.round_offset
        self._round_started = time.perf_counter()
        self._sampled = self.sample(server_round)
        messages = [Message(content=RecordDict({
            "encoder": arrays,  # one object, pushed once however many messages share it
            "config": ConfigRecord({"run-config": self.run_config_json, "server-round": server_round,
                                    "warm-start": self.is_warm_start(server_round), "partition-id": pid}),
        }), message_type="train", dst_node_id=self.node_of_partition[pid]) for pid in self._sampled]
        self._sent = tuple(zip(messages, self._sampled))  # the grid sets their message ids when it sends them
        return messages

    def partition_of_reply(self, reply: Message) -> int:
        """The task a reply answers: the one its message named (a node may serve several), else its node's."""
        sent = {m.metadata.message_id: pid for m, pid in self._sent}
        pid = sent.get(getattr(reply.metadata, "reply_to_message_id", ""))
        return pid if pid is not None else self.partition_of_node.get(reply.metadata.src_node_id, -1)

    def failed_tasks(self, replies: list[Message]) -> dict[int, str]:
        """Sampled tasks without a usable reply: the client raised, or did not answer in time."""
        failed = {self.partition_of_reply(m): m.error.reason for m in replies if m.has_error()}
        answered = {self.partition_of_reply(m) for m in replies}
        failed.update({pid: "no reply before federation.reply_timeout" for pid in self._sampled
                       if pid not in answered})
        return dict(sorted(failed.items()))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Aggregate the replies that arrived, in partition-id order; failed tasks are dropped.

        Without DP the mean is over the tasks that replied; with DP the divisor stays the
        expected number of tasks, so the noise and the accounting stay valid (a failed task
        contributes a zero update, which clipping allows).
        """
        server_round += self.round_offset
        replies = list(replies)
        failed = self.failed_tasks(replies)
        if failed and len(failed) > self.max_failed_fraction * len(self._sampled):
            pid, reason = next(iter(failed.items()))
            raise FederationError(
                f"round {server_round}: {len(failed)} of {len(self._sampled)} sampled tasks failed "
                f"(more than federation.max_failed_fraction = {self.max_failed_fraction:g}); "
                f"task {pid}: {reason}")
        replies = sorted((m for m in replies if not m.has_error()),
                         key=lambda m: int(m.content["metrics"]["partition-id"]))
        losses = [float(m.content["metrics"]["loss"]) for m in replies]
        stats: dict = {}
        if not self.is_warm_start(server_round):
            grads = [m.content["encoder-grad"].to_torch_state_dict() for m in replies]
            stats = self.aggregator.step(grads, server_round)
        row = round_row(server_round, warm=self.is_warm_start(server_round),
                        tasks=[int(m.content["metrics"]["partition-id"]) for m in replies],
                        loss=sum(losses) / len(losses) if losses else float("nan"),
                        seconds=time.perf_counter() - self._round_started, stats=stats)
        if failed:
            row["failed"] = {str(pid): reason for pid, reason in failed.items()}
        if self.on_round:
            self.on_round(row)
        metrics = MetricRecord({"loss": row["loss"], "num-tasks": len(replies)})
        return ArrayRecord(torch_state_dict=self.aggregator.state()), metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # utility is measured once, after the last round (see server_app)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None


def check_replies(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    for reply in replies:
        if reply.has_error():
            raise FederationError(f"a client failed: {reply.error.reason}")
    return replies
