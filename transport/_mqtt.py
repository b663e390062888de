"""The MQTT 5 adapter: paho-mqtt 2.x driven by the asyncio event loop.

How it works
------------
paho does the MQTT framing; the socket lives on the event loop. After a
connect, the socket is registered with ``loop.add_reader`` (→ ``loop_read``)
and, whenever paho has bytes queued, ``loop.add_writer`` (→ ``loop_write``);
a small task calls ``loop_misc`` once a second for keepalive. There is no paho
thread and no ``loop_start``. The only blocking paho call, ``reconnect()``
(DNS, TCP connect, TLS handshake, all with blocking sockets), runs in a worker
thread via ``asyncio.to_thread``; while it runs nothing else touches the paho
client (publishes wait for it), and its socket callbacks are marshalled back
to the loop.

Futures keyed by packet id: ``publish`` waits for the PUBACK of its mid,
``subscribe`` for its SUBACK; a failing MQTT 5 reason code becomes a
:class:`RefusedError` (for example 135 *Not authorized* from an ACL). At most
``min(max_inflight, broker's CONNACK ReceiveMaximum)`` publishes wait for
PUBACK on the wire; the rest wait in paho's queue (``max_queued_publishes``).

What happens on a lost link
---------------------------
The transport reconnects in the background with the shared
:class:`~maskfl.transport.Backoff` (``reconnect_min_s`` doubling up to
``reconnect_max_s``, equal jitter) and never gives up until
:meth:`MqttTransport.disconnect`. The back-off starts again from
``reconnect_min_s`` only after a link stayed up for 2 × ``reconnect_max_s``: a
link the broker keeps closing soon after accepting it (another process on the
same identity takes the session over; mosquitto 2.0 closes the old link without a
DISCONNECT packet) is retried ever more slowly instead of every second. Each change
of the likely cause (:func:`~maskfl.transport.diagnose`) is logged once and passed
to the listeners as a DISCONNECTED event with its ``cause``. When a TLS connect
fails before CONNACK without saying why (with TLS 1.3 the broker checks the client
certificate after the handshake, and its alert is often lost to the CONNECT already
sent), a second handshake that sends nothing reads the broker's alert
(``certificate revoked``, ``unknown ca``) for the diagnosis. After each CONNACK:

* subscriptions are sent again when the broker has no session for us
  (``session_present`` false);
* QoS 1 publishes still waiting for PUBACK are **retried**: paho keeps them and
  resends them with DUP set, and the caller's ``await publish(...)`` completes
  on the PUBACK of the new connection (at least once; the receiver must
  tolerate duplicates). QoS 0 publishes not yet written **fail** with
  :class:`NotConnectedError` (at most once);
* with ``manual_ack`` and ``session_present`` true, received messages from the
  old connection that are still in the queue are discarded, because the broker
  redelivers every unacked one (with ``dup`` set).

Incoming queue and backpressure
-------------------------------
Received messages go into a bounded queue (``incoming_queue_size``). When it
is full the transport stops reading the socket (``remove_reader``) until the
consumer takes a message: TCP backpressure, so the broker holds the rest and
nothing is dropped (with manual ack, QoS 1 deliveries are also bounded by
``receive_maximum``). One read pass may hand over a few packets more than the
bound (paho reads up to one packet per message it has in flight), so the queue
can briefly exceed it by that much. While reads are paused, PINGRESPs are not
read either: a consumer stalled for about 2 × keepalive sees the link recycled
by paho's keepalive check (with a persistent session and manual ack nothing is
lost; the unacked messages come back with ``dup`` set).

Sizes
-----
The broker's CONNACK ``MaximumPacketSize`` is read on every connect and a
publish whose packet would exceed it raises :class:`PayloadTooLargeError`
before anything is sent (paho does not enforce it, and mosquitto's answer to an
oversize publish sends paho into a resend loop). Our own
``max_incoming_payload`` is announced to the broker as our maximum packet size
(plus room for the topic), and a payload over it that still arrives is acked,
dropped, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from maskfl.protocol.errors import LocalProtocolError, TransportError

from ._blocking import reconnect, tls_probe
from ._config import MQTT_MAX_PACKET, MqttConfig
from ._errors import (
    NotConnectedError,
    PayloadTooLargeError,
    RefusedError,
    TransportClosedError,
)
from ._inbox import Inbox
from ._link import LinkBase
from ._paho import LARGE_PUBLISH, make_client, publish_packet_size, zero_copy_writes
from ._retry import TLS_HANDSHAKE_RESET, Backoff, Cause, Diagnosis, LinkReport, diagnose
from ._types import LinkEvent, LinkState, Message

log = logging.getLogger("maskfl.transport")

#: Room above ``max_incoming_payload`` in the maximum packet size we announce:
#: fixed header, topic (at most 65,535 bytes), packet id and properties.
_PACKET_OVERHEAD = 65_535 + 1024
_MISC_INTERVAL_S = 1.0
_DISCONNECT_TIMEOUT_S = 5.0


@dataclass(slots=True)
class _PendingPublish:
    future: asyncio.Future[None]
    topic: str
    qos: int


class MqttTransport(LinkBase):
    """One MQTT 5 connection through paho, for asyncio code.

    Use as ``async with MqttTransport(config) as t: ...`` or call
    :meth:`connect` and :meth:`disconnect`. One task should consume
    :meth:`messages` (or :meth:`receive`); any task may publish.
    """

    def __init__(self, config: MqttConfig) -> None:
        super().__init__(log)
        self._config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._client = self._make_client(config)
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s)
        self._report = LinkReport(log, f"mqtt {config.address}")
        self._stable_s = 2 * config.reconnect_max_s
        self._up_since = 0.0
        self._short_losses = 0
        self._clean_reconnect = True  # no failed attempt since the last lost link
        self._refused: RefusedError | None = None  # the last refusal on the current link

        # Connection bookkeeping (touched only on the loop thread).
        self._link = 0
        self._connack: asyncio.Future[tuple[bool, Properties | None]] | None = None
        self._connected = asyncio.Event()
        self._link_lost = asyncio.Event()
        self._idle = asyncio.Event()  # set while no reconnect() runs in a thread
        self._idle.set()
        self._abandoned = False  # an attempt was cancelled while its thread ran
        self._socket_closed = asyncio.Event()
        self._socket_closed.set()
        self._max_packet: int = MQTT_MAX_PACKET
        self._tasks: list[asyncio.Task[None]] = []

        self._publishes: dict[int, _PendingPublish] = {}
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._subscriptions: dict[str, SubscribeOptions] = {}

        self._inbox = Inbox(
            config, self._stats, pause=self._stop_reading, resume=self._start_reading
        )

    # ------------------------------------------------------------------ public

    @property
    def config(self) -> MqttConfig:
        return self._config

    @property
    def max_packet_size(self) -> int:
        """The broker's maximum packet size from the last CONNACK (MQTT's own if unset)."""
        return self._max_packet

    async def connect(self) -> None:
        """Open the connection; return after CONNACK (and the first subscriptions).

        Raises :class:`TransportError` if this first attempt fails (refused,
        TLS verification, bad credentials, timeout), with ``host:port`` in the
        message, so misconfiguration surfaces at start. After a successful
        connect, later link losses are repaired in the background.
        """
        if self._state is not LinkState.NEW:
            raise LocalProtocolError(f"connect() on a transport that is {self._state}")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        cfg = self._config
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if cfg.session_expiry_s:
            props.SessionExpiryInterval = cfg.session_expiry_s
        props.ReceiveMaximum = cfg.receive_maximum
        # paho validates this property against 268,435,455 (the largest remaining length),
        # not the largest packet: a larger announcement raises in CONNECT.
        props.MaximumPacketSize = min(cfg.max_incoming_payload + _PACKET_OVERHEAD, 268_435_455)
        self._client.connect_async(
            cfg.host, cfg.port, cfg.keepalive_s, clean_start=cfg.clean_start, properties=props
        )
        try:
            await self._attempt()
        except BaseException:
            # connect() may be called again; drop whatever the attempt left open.
            if self._idle.is_set():
                self._force_close()
            if not self._is_closed():
                self._state = LinkState.NEW
            raise
        self._tasks = [
            asyncio.create_task(self._supervise(), name=f"mqtt-reconnect {cfg.address}"),
            asyncio.create_task(self._misc(), name=f"mqtt-keepalive {cfg.address}"),
        ]

    async def disconnect(self) -> None:
        """Send DISCONNECT and close; pending publishes and receivers get
        :class:`TransportClosedError`. A persistent session stays on the broker
        (unacked messages are redelivered on the next connect). Idempotent."""
        if self._state is LinkState.CLOSED:
            return
        was_new = self._state is LinkState.NEW
        self._state = LinkState.CLOSED
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if not was_new:
            await self._idle.wait()
            if self._client.socket() is not None:
                self._client.disconnect()
                try:
                    async with asyncio.timeout(_DISCONNECT_TIMEOUT_S):
                        await self._socket_closed.wait()
                except TimeoutError:
                    self._force_close()
        closed = TransportClosedError(f"MQTT transport to {self._config.address} closed")
        self._fail_pending(closed, qos0_only=False)
        self._inbox.close()
        self._connected.set()  # wake wait_connected(), which re-checks the state
        log.info("mqtt %s: closed", self._config.address)
        self._notify(LinkEvent(LinkState.CLOSED, "disconnect() called"))

    async def wait_connected(self) -> None:
        """Return once the link is up; :class:`TransportClosedError` if closed."""
        while True:
            if self._state is LinkState.CLOSED:
                raise TransportClosedError(f"MQTT transport to {self._config.address} closed")
            if self._state is LinkState.CONNECTED:
                return
            self._connected.clear()
            await self._connected.wait()

    async def publish(
        self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and wait for the PUBACK (QoS 1) or for the bytes to be written (QoS 0).

        QoS 1 survives link losses: paho resends it after the reconnect and this
        call returns on that PUBACK (wrap it in ``asyncio.timeout`` to bound the
        wait; a cancelled call leaves the message queued in paho, which still
        sends it). Raises :class:`PayloadTooLargeError` before sending anything
        if the packet exceeds the broker's maximum, :class:`RefusedError` on a
        failing reason code (not authorized, quota exceeded, ...),
        :class:`NotConnectedError` for QoS 0 while the link is down,
        :class:`TransportClosedError` after :meth:`disconnect`. A bytearray payload
        must not change afterwards: paho keeps it to resend after a reconnect.
        """
        self._check_open()
        self._check_publish(topic, qos)
        size = publish_packet_size(topic, len(payload), qos)
        if size > self._max_packet:
            raise PayloadTooLargeError(
                f"publish to {topic!r} refused locally: packet of {size} bytes exceeds the "
                f"maximum packet size {self._max_packet} of {self._config.address}",
                size=size,
                limit=self._max_packet,
            )
        await self._idle.wait()
        self._check_open()
        if qos == 0 and self._state is not LinkState.CONNECTED:
            raise NotConnectedError(f"QoS 0 publish to {topic!r}: {self._config.address} is down")
        # paho copies the payload into its packet; a bytearray goes as it is (bytes() would
        # copy it first: 100 MB of fresh memory for a model of 2.5e7 parameters).
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if len(payload) >= LARGE_PUBLISH:
            zero_copy_writes(self._client)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(
                f"publish to {topic!r}: {self._config.max_queued_publishes} publishes already "
                f"wait for {self._config.address}"
            )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN) or (
            qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS
        ):
            raise TransportError(
                f"publish to {topic!r} on {self._config.address}: {paho.error_string(info.rc)}"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published():
            self._stats.published += 1
            return
        pending = _PendingPublish(self._future(), topic, qos)
        self._publishes[info.mid] = pending
        try:
            await pending.future
        finally:
            if self._publishes.get(info.mid) is pending:
                del self._publishes[info.mid]

    async def subscribe(
        self, filters: str | Iterable[str], *, qos: int = 1, retained: bool = True
    ) -> list[int]:
        """Subscribe and return the granted QoS per filter.

        The filters are remembered and sent again after a reconnect that finds
        no session. If the link drops before the SUBACK, the SUBSCRIBE is sent
        again on the next connection. Raises :class:`RefusedError` if the
        broker refuses a filter (that filter is then forgotten). ``retained``
        False: the broker sends none of the filters' retained messages (MQTT 5
        retain handling 2, "do not send"), only what is published from now on.
        """
        self._check_open()
        wanted = self._check_subscribe(filters, qos)
        options = SubscribeOptions(
            qos=qos,
            retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            if retained
            else SubscribeOptions.RETAIN_DO_NOT_SEND,
        )
        for topic_filter in wanted:
            self._subscriptions[topic_filter] = options
        while True:
            await self.wait_connected()
            try:
                codes = await self._send_subscribe(dict.fromkeys(wanted, options))
            except NotConnectedError:
                continue
            refused = [(f, c) for f, c in zip(wanted, codes, strict=False) if c.is_failure]
            for topic_filter, _ in refused:
                self._subscriptions.pop(topic_filter, None)
            if refused:
                topic_filter, code = refused[0]
                raise RefusedError(
                    f"{self._config.address} refused the subscription to {topic_filter!r}: "
                    f"{code.getName()} ({code.value})",
                    packet="SUBACK",
                    reason_code=code.value,
                    reason=code.getName(),
                )
            return [c.value for c in codes]

    async def unsubscribe(self, filters: str | Iterable[str]) -> None:
        """Forget the filters and unsubscribe from them if the link is up."""
        self._check_open()
        dropped = [filters] if isinstance(filters, str) else list(filters)
        for topic_filter in dropped:
            self._subscriptions.pop(topic_filter, None)
        if self._state is LinkState.CONNECTED:
            self._client.unsubscribe(dropped)

    async def receive(self) -> Message:
        """The next received message; waits for one. :class:`TransportClosedError` once closed."""
        return await self._inbox.take(self._is_closed)

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack``.

        Call it once the message is durable on our side. It is a no-op without
        manual ack, for QoS 0, for a second ack, and for a message delivered on
        an earlier connection (the broker redelivers those).
        """
        if self._inbox.release(message, self._link):
            self._client.ack(message.mid, message.qos)

    # -------------------------------------------------------- connection logic

    async def _attempt(self) -> None:
        """One connection attempt: blocking connect in a thread, then await CONNACK."""
        self._state = LinkState.CONNECTING
        self._connack = self._future()
        sock = await self._open_socket()
        self._socket_closed.clear()
        self._inbox.paused = False
        self._start_reading()
        if self._client.want_write():
            self._add_writer(sock)
        session_present, props = await self._await_connack()
        self._max_packet = int(getattr(props, "MaximumPacketSize", MQTT_MAX_PACKET))
        if not session_present and self._subscriptions:
            await self._restore_subscriptions()
        if self._state is not LinkState.CONNECTING:  # closed or lost meanwhile
            raise TransportError(f"link to {self._config.address} lost right after connecting")
        self._up(session_present)

    async def _open_socket(self) -> Any:
        """paho's blocking ``reconnect()`` (DNS, TCP, TLS handshake, CONNECT) in a thread;
        the socket it opened."""
        assert self._loop is not None
        cfg = self._config
        self._idle.clear()
        worker = asyncio.ensure_future(asyncio.to_thread(reconnect, self._client))
        worker.add_done_callback(self._connect_thread_done)
        try:
            # Shielded: a cancelled attempt must not release the paho client while
            # the thread still works on it; the done callback cleans up instead.
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            self._abandoned = True
            raise
        except (OSError, ValueError) as exc:  # ssl.SSLError and CertificateError included
            error = TransportError(f"cannot connect to MQTT broker {cfg.address}: {exc}")
            error.__cause__ = exc
            explained = await self._explained(error)
            raise explained from explained.__cause__
        sock = self._client.socket()
        if sock is None:
            if self._is_closed():  # closed by disconnect() meanwhile
                raise TransportClosedError(f"MQTT transport to {cfg.address} closed")
            raise await self._explained(
                TransportError(f"{cfg.address} closed the connection before CONNACK")
            )
        return sock

    async def _await_connack(self) -> tuple[bool, Properties | None]:
        """``(session_present, properties)`` of the CONNACK, within ``connect_timeout_s``."""
        assert self._connack is not None
        cfg = self._config
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                return await self._connack
        except (RefusedError, TransportClosedError):
            raise
        except TransportError as exc:
            explained = await self._explained(exc)
            raise explained from explained.__cause__
        except TimeoutError as exc:
            self._force_close()
            self._link_down("no CONNACK in time")
            raise TransportError(
                f"MQTT broker {cfg.address} sent no CONNACK within {cfg.connect_timeout_s} s"
            ) from exc

    async def _restore_subscriptions(self) -> None:
        """The broker kept no session: subscribe again (a refused filter is logged)."""
        cfg = self._config
        try:
            codes = await self._send_subscribe(dict(self._subscriptions))
        except NotConnectedError as exc:
            raise TransportError(
                f"{cfg.address} dropped the link while subscriptions were restored"
            ) from exc
        for (topic_filter, _), code in zip(self._subscriptions.items(), codes, strict=False):
            if code.is_failure:
                log.error(
                    "mqtt %s: resubscription to %r refused: %s",
                    cfg.address,
                    topic_filter,
                    code.getName(),
                )

    def _up(self, session_present: bool) -> None:
        """The link is up: state, counters, the log line and the CONNECTED event."""
        cfg = self._config
        self._state = LinkState.CONNECTED
        self._stats.connects += 1
        self._connected.set()
        self._up_since = time.monotonic()
        log.log(
            logging.INFO if self._stats.connects == 1 else logging.DEBUG,
            "mqtt %s: connected as %r (session present: %s, broker max packet %d)",
            cfg.address,
            cfg.client_id,
            session_present,
            self._max_packet,
        )
        self._report.up()
        self._notify(LinkEvent(LinkState.CONNECTED, "connected", session_present))

    async def _explained(self, error: TransportError) -> TransportError:
        """``error``, or a clearer one if the broker's TLS alert says why it closed.

        Only for a TLS connect that failed without a diagnosis of its own. A probe (in a
        thread, sending no MQTT bytes) reads the alert TLS 1.3 may lose to a reset; when
        no TLS handshake completes at all, the error is marked
        :data:`TLS_HANDSHAKE_RESET` (nothing at that port speaks TLS), which
        :func:`diagnose` reads."""
        tls = self._config.tls
        if tls is None or diagnose(error).cause not in (Cause.LINK_LOST, Cause.NOT_MQTT_TLS):
            return error
        alert, speaks_tls = await asyncio.to_thread(tls_probe, self._config)
        if alert is None:
            if not speaks_tls and diagnose(error).cause is Cause.LINK_LOST:
                marked = TransportError(f"{error}: {TLS_HANDSHAKE_RESET}")
                marked.__cause__ = error.__cause__
                return marked
            return error
        # OpenSSL's SSLV3_ALERT_CERTIFICATE_REVOKED reads as the alert's name in RFC 8446.
        name = str(alert.reason).split("ALERT_", 1)[-1].replace("_", " ").lower()
        explained = TransportError(f"{error}: the broker sent TLS alert '{name}'")
        explained.__cause__ = alert
        return explained

    async def _supervise(self) -> None:
        """Reconnect forever after each lost link, with the shared back-off."""
        while True:
            await self._link_lost.wait()
            self._link_lost.clear()
            while self._state is LinkState.DISCONNECTED:
                await self._backoff.wait()
                try:
                    await self._attempt()
                except TransportClosedError:
                    return
                except TransportError as exc:
                    if self._is_closed():
                        return
                    self._state = LinkState.DISCONNECTED
                    self._stats.connect_failures += 1
                    self._clean_reconnect = False
                    self._failed(diagnose(exc))

    async def _misc(self) -> None:
        """paho's keepalive work (PINGREQ, dead-link detection), once a second."""
        while True:
            await asyncio.sleep(_MISC_INTERVAL_S)
            if self._idle.is_set() and self._client.socket() is not None:
                self._client.loop_misc()

    async def _send_subscribe(self, filters: dict[str, SubscribeOptions]) -> list[ReasonCode]:
        """Send one SUBSCRIBE and await its SUBACK; NotConnectedError if the link drops."""
        assert self._loop is not None
        rc, mid = self._client.subscribe(list(filters.items()))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnectedError(f"subscribe: {self._config.address} is down")
        future: asyncio.Future[list[ReasonCode]] = self._future()
        self._subacks[mid] = future
        try:
            return await future
        finally:
            self._subacks.pop(mid, None)

    def _link_down(self, reason: str) -> None:
        """Bookkeeping when the socket is gone, whoever noticed first."""
        cfg = self._config
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(
                TransportError(f"{cfg.address} closed the connection before CONNACK: {reason}")
            )
        self._inbox.unacked.clear()
        self._fail_pending(NotConnectedError(f"link to {cfg.address} lost: {reason}"), True)
        if self._state is LinkState.CONNECTED:
            self._state = LinkState.DISCONNECTED
            self._connected.clear()
            self._stats.disconnects += 1
            diagnosis = diagnose(reason)
            stable = time.monotonic() - self._up_since >= self._stable_s
            if stable:
                self._short_losses = 0
                self._backoff.reset()
                self._report.settled()
            refused, self._refused = self._refused, None
            if refused is not None:
                # mosquitto 2.0.11 closes a link after refusing a publish on it: the publisher got
                # the RefusedError and reports its cause; this loss is its consequence.
                log.debug("mqtt %s: link closed after %s", cfg.address, refused)
                self._link_lost.set()
                self._notify(
                    LinkEvent(LinkState.DISCONNECTED, str(refused), cause=diagnose(refused).cause)
                )
                return
            if not stable:
                # A takeover leaves the broker up: the link came back at the first try.
                # After a broker restart the attempts in between failed: not the pattern.
                self._short_losses = self._short_losses + 1 if self._clean_reconnect else 1
            self._clean_reconnect = True
            if not stable and diagnosis.cause is Cause.LINK_LOST and self._short_losses >= 2:
                # Closed soon after it was accepted, again: mosquitto does this to the
                # older of two connections with one client id (no DISCONNECT packet).
                diagnosis = Diagnosis(Cause.TAKEN_OVER, f"{reason}, again within seconds")
            self._link_lost.set()
            self._failed(diagnosis, force_event=True)

    def _failed(self, diagnosis: Diagnosis, *, force_event: bool = False) -> None:
        """Log a failure once per change of cause; tell the listeners."""
        changed = self._report.failed(diagnosis)
        if changed or force_event:
            self._notify(LinkEvent(LinkState.DISCONNECTED, diagnosis.detail, cause=diagnosis.cause))

    def _fail_pending(self, exc: TransportError, qos0_only: bool) -> None:
        for pending in list(self._publishes.values()):
            if (pending.qos == 0 or not qos0_only) and not pending.future.done():
                pending.future.set_exception(exc)
        for future in self._subacks.values():
            if not future.done():
                future.set_exception(exc)
        if not qos0_only and self._connack is not None and not self._connack.done():
            self._connack.set_exception(exc)

    def _future(self) -> asyncio.Future[Any]:
        """A future whose exception counts as retrieved: a link loss fails futures
        nobody may be awaiting any more (a cancelled caller, an abandoned attempt)."""
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _is_closed(self) -> bool:
        return self._state is LinkState.CLOSED

    def _check_open(self) -> None:
        if self._state is LinkState.CLOSED:
            raise TransportClosedError(f"MQTT transport to {self._config.address} closed")
        if self._state is LinkState.NEW:
            raise LocalProtocolError("call connect() before using the transport")

    # ---------------------------------------------------------------- socket io

    def _start_reading(self) -> None:
        sock = self._client.socket()
        if sock is None or self._loop is None:
            return
        self._loop.add_reader(sock, self._on_readable)
        # TLS may hold decrypted bytes the selector cannot see.
        self._loop.call_soon(self._drain_pending)

    def _stop_reading(self) -> None:
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)

    def _on_readable(self) -> None:
        if not self._idle.is_set():  # a stale call while reconnect() runs in its thread
            return
        self._client.loop_read()
        self._drain_pending()

    def _drain_pending(self) -> None:
        sock = self._client.socket()
        if (
            not self._inbox.paused
            and self._idle.is_set()
            and isinstance(sock, ssl.SSLSocket)
            and sock.pending() > 0
            and self._loop is not None
        ):
            self._loop.call_soon(self._on_readable)

    def _connect_thread_done(self, worker: asyncio.Future[MQTTErrorCode]) -> None:
        self._idle.set()
        if not worker.cancelled():
            worker.exception()  # retrieved here; _attempt re-raises it when still waiting
        if self._abandoned or self._state is LinkState.CLOSED:
            self._abandoned = False
            self._force_close()

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _force_close(self) -> None:
        """Drop the socket now. paho has no public call for this (``disconnect()``
        needs a writable link), so this uses its ``_sock_close``, which also runs
        our socket-close callback."""
        self._client._sock_close()
        self._socket_closed.set()

    def _on_loop(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn`` on the event loop: directly there, marshalled from the connect thread."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    # ----------------------------------------------------------- paho callbacks

    def _make_client(self, cfg: MqttConfig) -> paho.Client:
        client = make_client(cfg)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_message = self._cb_message
        client.on_socket_close = self._cb_socket_close
        client.on_socket_register_write = self._cb_register_write
        client.on_socket_unregister_write = self._cb_unregister_write
        return client

    def _cb_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if self._connack is None or self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(
                RefusedError(
                    f"MQTT broker {self._config.address} refused the connection: "
                    f"{reason.getName()} ({reason.value})",
                    packet="CONNACK",
                    reason_code=reason.value,
                    reason=reason.getName(),
                )
            )
            return
        # Synchronously, before paho hands over the messages that follow the
        # CONNACK in the same read: they belong to the new link.
        self._link += 1
        self._refused = None
        # MQTT 5: never more unacknowledged QoS 1 publishes than the broker's
        # Receive Maximum. paho 2.2 ignores that property and its setter refuses
        # while connected, so set the field here, before paho resends its queue
        # (which it does right after this callback).
        broker_max = int(getattr(props, "ReceiveMaximum", 65_535))
        client._max_inflight_messages = min(self._config.max_inflight, broker_max)
        self._inbox.new_link(flags.session_present)
        self._connack.set_result((flags.session_present, props))

    def _cb_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        source = "broker sent DISCONNECT: " if flags.is_disconnect_packet_from_server else ""
        self._link_down(f"{source}{reason.getName()}")

    def _cb_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        props: Properties,
    ) -> None:
        pending = self._publishes.get(mid)
        if pending is None or pending.future.done():
            return
        if reason.is_failure:
            self._stats.publish_refused += 1
            self._refused = RefusedError(
                f"MQTT broker {self._config.address} refused the publish to "
                f"{pending.topic!r}: {reason.getName()} ({reason.value})",
                packet="PUBACK",
                reason_code=reason.value,
                reason=reason.getName(),
            )
            pending.future.set_exception(self._refused)
        else:
            self._stats.published += 1
            pending.future.set_result(None)

    def _cb_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        codes: list[ReasonCode],
        props: Properties,
    ) -> None:
        future = self._subacks.get(mid)
        if future is not None and not future.done():
            future.set_result(list(codes))

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._inbox.deliver(client, msg, self._link, self._tapped)

    def _cb_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def close() -> None:
            if self._loop is not None:
                # ValueError: a socket already closed and never registered.
                with contextlib.suppress(ValueError, KeyError):
                    self._loop.remove_reader(sock)
                    self._loop.remove_writer(sock)
            self._socket_closed.set()

        self._on_loop(close)

    def _cb_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        # Marshalled from the connect thread, this may run after that socket died.
        current = self._client.socket()
        if self._loop is not None and current is not None and sock is current:
            self._loop.add_writer(current, self._on_writable)

    def _cb_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            self._on_loop(self._loop.remove_writer, sock)
