"""AWS IoT Greengrass v2 integration over the nucleus' IPC socket.

Used only when the nucleus started us (it sets
``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``):

* the configuration is read with ``GetConfiguration`` (the component's
  ``DefaultConfiguration`` merged with the deployment's updates; its keys
  are :class:`~edge_runtime.config.RuntimeConfig`'s, one to one);
* ``SubscribeToConfigurationUpdate`` delivers config-only deployments while
  we run: each update builds a new config object, which the service applies
  live (threshold, results topic, model bundle, limits) or rejects, keeping
  the old one and saying why;
* ``UpdateState(RUNNING)`` once the service is up;
* ``PublishToTopic`` / ``PublishToIoTCore`` for the two Greengrass sinks
  (:mod:`edge_runtime.sinks.greengrass`).

awsiotsdk is imported lazily: boxes without Greengrass do not need it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from .config import RuntimeConfig
from .errors import EdgeRuntimeError, PublishError
from .hosts import ConfigOutcome, MethodCall, config_update_handler

__all__ = [
    "GreengrassIpc",
    "config_update_handler",
    "resolve_recipe_variables",
    "running_under_greengrass",
]

log = logging.getLogger(__name__)

SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"  # noqa: S105 - the name of the variable, not a secret


def running_under_greengrass(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get(SOCKET_ENV)) and bool(env.get(TOKEN_ENV))


def resolve_recipe_variables(config: dict[str, Any], environ: Any) -> dict[str, Any]:
    """Resolve the recipe variables a nucleus without interpolateComponentConfiguration leaves.

    ``Model.BundlePath`` names the model component's artifact folder and
    ``Mqtt.ClientId`` the thing name; the lifecycle script exports the first as
    ``EDGE_RUNTIME_MODEL_DIR`` and the nucleus always sets ``AWS_IOT_THING_NAME``.
    """
    config = copy.deepcopy(config)
    model = config.get("Model")
    model_dir = environ.get("EDGE_RUNTIME_MODEL_DIR")
    if isinstance(model, dict) and "{" in str(model.get("BundlePath", "")) and model_dir:
        model["BundlePath"] = model_dir
    mqtt = config.get("Mqtt")
    if isinstance(mqtt, dict) and "{iot:thingName}" in str(mqtt.get("ClientId", "")):
        thing = environ.get("AWS_IOT_THING_NAME")
        if thing:
            mqtt["ClientId"] = str(mqtt["ClientId"]).replace("{iot:thingName}", thing)
    return config


class GreengrassIpc:
    """A thin, typed wrapper around ``GreengrassCoreIPCClientV2`` (a :class:`~.hosts.Host`)."""

    name = "AWS IoT Greengrass"

    def __init__(self, client: Any = None) -> None:
        if client is None:
            try:
                from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
            except ImportError as exc:
                raise EdgeRuntimeError(
                    "The Greengrass IPC client (awsiotsdk) is not installed.",
                    action="Reinstall the runtime (awsiotsdk is one of its dependencies), or "
                    "pip install 'awsiotsdk>=1.20'.",
                ) from exc
            client = GreengrassCoreIPCClientV2()
        self.client = client
        self._subscriptions: list[Any] = []

    def get_configuration(self) -> dict[str, Any]:
        """This component's whole configuration, without its accessControl policy."""
        response = self.client.get_configuration(key_path=[])
        value = dict(response.value or {})
        value.pop("accessControl", None)
        return value

    def load_config(self, environ: dict[str, str] | None = None) -> RuntimeConfig:
        config = resolve_recipe_variables(
            self.get_configuration(), os.environ if environ is None else environ
        )
        return RuntimeConfig.from_mapping(config, source="Greengrass component configuration")

    def subscribe_to_config_updates(self, on_update: Callable[[], None]) -> None:
        """Call ``on_update()`` (on the SDK's thread) whenever a deployment changes our config."""

        def on_event(event: Any) -> None:
            update = getattr(event, "configuration_update_event", None)
            key_path = list(getattr(update, "key_path", []) or [])
            log.info("Greengrass configuration update (key path %s)", "/".join(key_path) or "/")
            on_update()

        def on_error(error: Exception) -> bool:
            log.error("Greengrass configuration subscription error: %s", error)
            return False  # keep the stream open

        _, operation = self.client.subscribe_to_configuration_update(
            key_path=[],
            on_stream_event=on_event,
            on_stream_error=on_error,
            on_stream_closed=lambda: log.warning("Greengrass configuration stream closed"),
        )
        self._subscriptions.append(operation)

    def report_running(self) -> None:
        self.client.update_state(state="RUNNING")

    def config_outcome(self, outcome: ConfigOutcome) -> None:
        """Nothing to tell the nucleus: a refused update shows in the status and the log."""

    def serve_methods(self, call: MethodCall) -> None:
        """Greengrass has no remote calls into a component: the CLI on the box answers them."""

    def problem(self) -> str | None:
        """The nucleus is local: a failed call says itself (PublishError), there is no connection state."""
        return None

    def report_status(self, snapshot: dict[str, Any]) -> None:
        """The health report to AWS IoT Core is sent by :class:`~.health.Health` (report_to_cloud)."""

    def report_errored(self) -> None:
        self.client.update_state(state="ERRORED")

    def publish_local(self, topic: str, payload: str) -> None:
        """``PublishToTopic``; raises :class:`PublishError` naming why the nucleus refused."""
        from awsiot.greengrasscoreipc.model import JsonMessage, PublishMessage

        message = PublishMessage(json_message=JsonMessage(message=json.loads(payload)))
        with _translate_ipc_errors("PublishToTopic", topic):
            self.client.publish_to_topic(topic=topic, publish_message=message)

    def publish_iot_core(self, topic: str, payload: str, qos: int, *, retain: bool = False) -> None:
        """``PublishToIoTCore``; raises :class:`PublishError` naming why the nucleus refused."""
        from awsiot.greengrasscoreipc.model import QOS

        with _translate_ipc_errors("PublishToIoTCore", topic):
            self.client.publish_to_iot_core(
                topic_name=topic,
                qos=QOS.AT_LEAST_ONCE if qos >= 1 else QOS.AT_MOST_ONCE,
                payload=payload.encode("utf-8"),
                retain=retain,
            )

    def close(self) -> None:
        for operation in self._subscriptions:
            try:
                operation.close().result(timeout=2)
            except Exception:
                log.debug("closing a subscription failed", exc_info=True)
        self._subscriptions.clear()
        try:
            self.client.close()
        except Exception:
            log.debug("closing the IPC client failed", exc_info=True)


@contextlib.contextmanager
def _translate_ipc_errors(operation: str, topic: str) -> Iterator[None]:
    """The IPC client's errors as :class:`PublishError`, with what an admin can do about each."""
    try:
        yield
    except Exception as exc:
        kind = type(exc).__name__
        if kind == "UnauthorizedError":
            action = (
                f"The component's accessControl policy does not allow {operation} on {topic!r}: "
                "add the topic to the recipe's accessControl (aws.greengrass.ipc.pubsub or "
                "aws.greengrass.ipc.mqttproxy) and redeploy. Results wait in the journal meanwhile."
            )
        else:
            action = (
                "Check that the Greengrass nucleus is running (greengrass-cli component list) and its "
                "log; results wait in the journal and are sent again."
            )
        raise PublishError(
            f"Greengrass {operation} to {topic!r} failed: {kind}: {exc}", action=action
        ) from exc
