"""The Last Will the broker publishes when a box vanishes names the model it ran.

The service used to build the MQTT sink before it loaded the model, then tell the sink; the will
was built once in the constructor, so an unexpected disconnect published "offline" with no model.
The sink now reads the running model (given when it is built); a will is fixed for the life of a
connection (MQTT sends it in CONNECT), so after a model switch the next connection carries the new
one. Real Mosquitto; the connection is cut without a DISCONNECT (as a power cut or a dead network
would), which makes the broker publish the will.
"""

from __future__ import annotations

import socket

from helpers import Subscriber

from edge_runtime.config import MqttConfig
from edge_runtime.sinks.mqtt import MqttSink

V2 = {"name": "pneumonia-cxr", "version": "0.2.0"}
V3 = {"name": "pneumonia-cxr", "version": "0.3.0"}


def _cut(sink: MqttSink) -> None:
    """Drop the TCP connection under paho, as a dead network would (no DISCONNECT packet)."""
    sock = sink._client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)


def _states(watcher: Subscriber) -> list[tuple[str, str]]:
    return [(p.get("state"), (p.get("model") or {}).get("version")) for _, p, _ in list(watcher.messages)]


def test_the_last_will_names_the_running_model_and_follows_a_switch(mosquitto) -> None:
    config = MqttConfig.model_validate(
        {"Host": mosquitto.host, "Port": mosquitto.port, "ClientId": "will-box", "TopicPrefix": "will/edge"}
    )
    watcher = Subscriber(mosquitto, config.status_topic)
    running = {"model": V2}
    sink = MqttSink(config, model=lambda: running["model"])  # as the service builds it
    try:
        sink.start()
        assert sink.wait_connected(10)
        watcher.wait_for(lambda ps: any(p.get("state") == "online" for p in ps), timeout_s=10)
        running["model"] = V3  # a model switch: this connection's will still names 0.2.0
        _cut(sink)
        watcher.wait_for(lambda ps: ("offline", "0.2.0") in _states(watcher), timeout_s=30)
        offline = next(p for _, p, _ in watcher.messages if p.get("state") == "offline")
        assert offline["model"] == V2 and offline["reason"] == "connection lost"
        # paho reconnects (with the current will) and says online again, naming 0.3.0.
        watcher.wait_for(lambda ps: _states(watcher)[-1] == ("online", "0.3.0"), timeout_s=60)
        _cut(sink)
        watcher.wait_for(lambda ps: ("offline", "0.3.0") in _states(watcher), timeout_s=60)
    finally:
        sink.stop(timeout_s=2)
        watcher.close()
