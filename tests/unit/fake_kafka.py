"""One stand-in for kafka-python's producer, for unit tests of what publishes (the Kafka loop,
ingestion): it records what was sent, and can refuse to acknowledge (``fail_with``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeFuture:
    """A send's result: ``get`` raises the error the producer was told to fail with."""

    error: Exception | None = None

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes
    value: bytes


@dataclass
class FakeProducer:
    """Acknowledges every send unless ``fail_with`` is set (then nothing is kept and each
    future raises it) or ``refuse_with`` (then ``send`` raises it). ``events`` gets "flush" on
    each flush, in order with a fake consumer's commits when the two share the list."""

    sent: list[Sent] = field(default_factory=list)
    fail_with: Exception | None = None
    events: list[str] = field(default_factory=list)
    # raised by send itself, as kafka-python does when it cannot get the topic's metadata
    refuse_with: Exception | None = None

    def send(self, topic: str, key: bytes, value: bytes,
             headers: list[tuple[str, bytes]] | None = None) -> FakeFuture:
        if self.refuse_with is not None:
            raise self.refuse_with
        if self.fail_with is None:
            self.sent.append(Sent(topic, key, value))
        return FakeFuture(self.fail_with)

    def flush(self, timeout: float | None = None) -> None:
        self.events.append("flush")

    def close(self, timeout: float | None = None) -> None:
        pass

    def on(self, topic: str) -> list[bytes]:
        """The values sent to ``topic``, in order."""
        return [s.value for s in self.sent if s.topic == topic]

    def values(self) -> list[bytes]:
        """Every value sent, in order."""
        return [s.value for s in self.sent]
