"""The HTTP face: an OpenAI-compatible FastAPI app over one runtime, with sessions.

Every turn is a request to the runtime's engine, so the requests of many clients share its batches. A client
names its session (X-Session-Id, or a `session_id` field) and sends only the new message, or sends the whole
conversation each time and is matched to the session holding it (`stateless.py`). Errors are OpenAI-shaped
JSON with the status a client can act on, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from importlib.metadata import version
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from chatrt.async_runtime import AsyncChatRuntime
from chatrt.config import ServeConfig
from chatrt.engine import Piece, TokenLogprob
from chatrt.errors import (
    ChatrtError,
    ConfigError,
    ContextLengthError,
    InvalidMessage,
    RuntimeClosed,
    SchemaError,
    SessionBusy,
    SessionClosed,
    SessionConflict,
    SessionLeased,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from chatrt.runtime import check_session_id
from chatrt.serve import wire
from chatrt.serve.stateless import Conversations, digest
from chatrt.serve.tenants import Tenant, Tenants
from chatrt.session import Session
from chatrt.stats import TurnStats
from chatrt.template import Message, ToolCall, order_problem
from chatrt.tools import Holdback, ToolError, tool_use
from chatrt.turn import AsyncTurn, Reply

M = TypeVar("M", bound=BaseModel)
HIGH, LOW = r"\\u[dD][89abAB][0-9a-fA-F]{2}", r"\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # UTF-16 surrogate escapes
LONE_SURROGATE = re.compile(f"{HIGH}(?!{LOW})|(?<!{HIGH}){LOW}")  # one without its other half: not Unicode
log = logging.getLogger("chatrt")
SESSION_HEADER = "x-session-id"


class HTTPError(Exception):
    """An error answered as OpenAI does: {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str, code: str | None = None, *, retry_after: int = 0,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.retry_after = status, message, type, code, retry_after
        self.param = param

    def body(self) -> wire.ErrorResponse:
        error = wire.ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return wire.ErrorResponse(error=error)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers)


def http_error(e: ChatrtError) -> HTTPError:
    """The status a client can act on for each of chatrt's errors."""
    message = str(e)
    if isinstance(e, ContextLengthError):
        return HTTPError(400, message, "invalid_request_error", "context_length_exceeded")
    if isinstance(e, ToolError):
        return HTTPError(400, message, "invalid_request_error", "unsupported_value", param=e.param)
    if isinstance(e, SchemaError):
        return HTTPError(400, message, "invalid_request_error", "invalid_value", param="response_format")
    if isinstance(e, InvalidMessage | ConfigError):
        return HTTPError(400, message, "invalid_request_error")
    if isinstance(e, SessionNotFound | SessionClosed):
        return HTTPError(404, message, "not_found_error", "session_not_found")
    if isinstance(e, SessionLeased | SessionBusy | SessionConflict):
        return HTTPError(409, message, "conflict_error", "session_in_use")
    if isinstance(e, TooManySessions | StoreUnavailable | RuntimeClosed):  # TooManySessions: the runtime's limit
        return HTTPError(503, message, "overloaded_error", retry_after=1)
    return HTTPError(500, message, "server_error")


class Server:
    """The app's state: the runtime, the tenants, the admission count, the stateless clients' sessions."""

    def __init__(self, art: AsyncChatRuntime, config: ServeConfig) -> None:
        self.art, self.config = art, config
        self.rt = art.sync
        self.model_id = config.model_name or self.rt.lm.info.name
        self.limit = self.rt.config.engine.max_batch + config.max_waiting
        self.in_flight = 0
        self._admission = threading.Lock()
        self.tenants = Tenants(config, self.rt.config.session.max_sessions, self.limit)
        self.conversations = Conversations(config.stateless_sessions)

    # -- requests in -------------------------------------------------------------------------------

    async def parse(self, request: Request, model: type[M]) -> M:
        """The body as `model`: 413 beyond max_body_bytes (read no further), 400 when it is not valid."""
        limit = int(self.config.max_body_bytes)
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPError(413, f"the request body is over {limit} bytes", "invalid_request_error")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPError(413, f"the request body is over {limit} bytes", "invalid_request_error")
        except ClientDisconnect:  # one line, not a traceback: a client that sends less than it said is cheap
            log.warning("%s %s: the client left after %d of %s bytes of its body", request.method,
                        request.url.path, len(body), request.headers.get("content-length", "?"))  # fmt: skip
            raise HTTPError(400, "the request body ended before its Content-Length", "invalid_request_error") from None
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"])) or "body"
            if err["type"] == "json_invalid" and LONE_SURROGATE.search(body.decode("utf-8", "replace")):
                raise HTTPError(400, "a string holds a lone surrogate escape (such as \\ud800): text must be valid "
                                "Unicode; send a surrogate pair or the character itself", "invalid_request_error",
                                param=where) from None  # fmt: skip
            raise HTTPError(400, f"{where}: {err['msg']}", "invalid_request_error", param=where) from None

    def authorize(self, request: Request) -> Tenant:
        """The tenant the request's API key names (401 without one)."""
        tenant = self.tenants.identify(request.headers.get("authorization", ""))
        if tenant is None:
            message = "a valid API key is required: send Authorization: Bearer <key>"
            raise HTTPError(401, message, "authentication_error", "invalid_api_key")
        return tenant

    def authorized(self, request: Request) -> bool:
        """Whether the request carries one of the server's API keys (there are some)."""
        return bool(self.tenants.keys) and self.tenants.identify(request.headers.get("authorization", "")) is not None

    def admit(self, tenant: Tenant, turns: int = 1) -> None:
        """Count a request's turns in (one per choice), or refuse them all: 503 when the engine's batch and queue
        are full, 429 when its tenant has its share in flight. Every admitted turn is counted out by `release`,
        once (from the thread that finished it)."""
        with self._admission:
            if self.in_flight + turns > self.limit:
                raise HTTPError(503, f"{self.in_flight} requests are running or queued, the most this server "
                                "takes; retry shortly", "overloaded_error", retry_after=1)  # fmt: skip
            if not self.tenants.admit(tenant, turns):
                raise HTTPError(429, f"tenant {tenant.name!r} has {self.tenants.max_requests} requests running or "
                                "queued, its share of this server (serve.tenant_requests); retry when one has ended",
                                "rate_limit_error", "rate_limit_exceeded", retry_after=1)  # fmt: skip
            self.in_flight += turns

    def release(self, tenant: Tenant, turns: int = 1) -> None:
        with self._admission:
            assert self.in_flight >= turns
            self.in_flight -= turns
            self.tenants.release(tenant, turns)

    # -- which session answers -------------------------------------------------------------------

    async def open_turns(self, req: wire.ChatRequest, header: str | None,
                         tenant: Tenant) -> list[tuple[Session, AsyncTurn]]:  # fmt: skip
        """The turns that answer this request (one per choice), not begun yet. Found or opened on a worker thread,
        as a task of its own: a client that leaves meanwhile still has its turns finished (stateless sessions
        given back)."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_turns, req, header, tenant))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_abandon)
            raise

    def _open_turns(self, req: wire.ChatRequest, header: str | None,
                    tenant: Tenant) -> list[tuple[Session, AsyncTurn]]:  # fmt: skip
        """Choice 0 is answered by the session that holds the conversation; each other choice by a fork of it,
        which references its cache and goes on as a conversation of its own."""
        session, asked, scope = self.resolve(req, header, tenant)
        sessions, turns = [session], []
        try:
            sessions += [self.fork(tenant, session, None) for _ in range(1, req.n or 1)]
            for k, s in enumerate(sessions):
                options = req.options(choice=k)
                if asked[0].role == "user":
                    turns.append(s.stream(asked[0].content, **options))
                else:
                    turns.append(s.stream_results({m.tool_call_id: m.content for m in asked}, **options))
        except BaseException:
            if scope is not None:
                for s in sessions:
                    self.give_back(scope, s, s.messages)
            raise
        for s, turn in zip(sessions, turns, strict=True):
            if scope is not None:  # indexed again once the turn has finished, under what it recorded
                turn.add_done_callback(lambda t, s=s: self.give_back(scope, s, t.transcript))
        return [(s, AsyncTurn(turn)) for s, turn in zip(sessions, turns, strict=True)]

    def resolve(self, req: wire.ChatRequest, header: str | None, tenant: Tenant) -> tuple[
        Session, list[Message], str | None
    ]:  # fmt: skip
        """The session of `tenant` that answers this request, what it answers (the user message, or the results
        of its last reply's calls), and for a stateless client the scope its conversations are matched in (its
        session is given back to the index under it once its turn has finished). Blocks (Redis may be asked)."""
        messages = joined_system([_message(m) for m in req.messages])
        results = 1 + next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role != "tool"), -1)
        asked = messages[results:] or messages[-1:]  # the tool results it ends with, or its last message
        if asked[0].role not in ("user", "tool"):
            raise HTTPError(400, "the last message must be the user's, or the results of the last reply's tool calls",
                            "invalid_request_error", param="messages")  # fmt: skip
        earlier = messages[: -len(asked)]
        session_id = header or req.session_id
        if session_id is not None:
            session = self.rt.session(tenant.internal(check_session_id(session_id)))
            if earlier and [m.digest_form() for m in earlier] != [m.digest_form() for m in session.transcript]:
                raise HTTPError(400, f"the messages do not continue session {session_id}: with a session id, send "
                                "only the new user message or the tool results", "invalid_request_error")  # fmt: skip
            in_order(session.messages, asked)  # as the session is now (its turn checks again, holding it)
            return session, asked, None
        system = earlier[0].content if earlier and earlier[0].role == "system" else None
        history = earlier[1:] if system is not None else earlier
        in_order(history, asked)
        scope = cache_scope(tenant, req.user, req.cache_salt)
        claimed = self.conversations.claim(scope, system, history)
        if claimed is not None:
            with contextlib.suppress(SessionNotFound, SessionClosed):
                session = self.rt.session(claimed)
                if not session.closed and digest(scope, session.system_prompt, session.messages) == digest(
                    scope, system, history
                ):
                    return session, asked, scope
                self.give_back(scope, session, session.messages)  # used by id meanwhile: another conversation
        return self.open(tenant, system, messages=history, scope=scope), asked, scope

    def open(self, tenant: Tenant, system_prompt: str | None, *, session_id: str | None = None,
             messages: Sequence[Message] = (), scope: str | None = None) -> Session:  # fmt: skip
        """A new session of `tenant`'s. At a limit (the tenant's share, or the runtime's session.max_sessions)
        the least recently used idle stateless session makes room first; only when there is none is the request
        refused, saying which limit. Blocks."""
        scope = cache_scope(tenant, None, None) if scope is None else scope
        return self.within_share(tenant, session_id, lambda internal: self.rt.open_session(
            system_prompt, session_id=internal, messages=messages, cache_scope=scope))  # fmt: skip

    def fork(self, tenant: Tenant, parent: Session, session_id: str | None) -> Session:
        """A fork of `parent` for `tenant`, within its share as `open`. Blocks."""
        return self.within_share(tenant, session_id, parent.fork)

    def within_share(self, tenant: Tenant, session_id: str | None, make: Callable[[str | None], Session]) -> Session:
        """`make(internal id)`: a new session of `tenant`'s (see `open`)."""
        internal = tenant.internal(check_session_id(session_id)) if session_id else None
        while True:
            if sum(tenant.owns(s.id) for s in self.rt.sessions()) < self.tenants.max_sessions:
                try:
                    return make(internal)
                except TooManySessions:  # the runtime's limit: any tenant's idle stateless session makes room
                    room = self.conversations.reclaim(lambda _: True)
                    if room is None:
                        raise
            else:  # the tenant's share: one of its own idle stateless sessions makes room
                room = self.conversations.reclaim(tenant.owns)
                if room is None:
                    raise HTTPError(429, f"tenant {tenant.name!r} holds {self.tenants.max_sessions} open sessions, its "
                                    "share of this server (serve.tenant_sessions); close some (DELETE "
                                    "/v1/sessions/{id}) or retry once idle ones expire (serve.session_idle_s)",
                                    "rate_limit_error", "rate_limit_exceeded", retry_after=60)  # fmt: skip
            self.close(room)

    def close(self, session_id: str) -> None:
        """Close a session the stateless index let go (it may be gone already). Blocks (Redis is asked)."""
        with contextlib.suppress(ChatrtError):
            self.rt.session(session_id).close()

    def give_back(self, scope: str, session: Session, transcript: list[Message] | None) -> None:
        """A stateless client's turn has finished and let its session go: it can be matched again, in its scope,
        under the transcript that turn left; the oldest beyond capacity are closed. Blocks (closing asks Redis)."""
        if session.closed or transcript is None:
            return
        for session_id in self.conversations.give_back(scope, session.id, session.system_prompt, transcript):
            self.close(session_id)

    def expire(self) -> int:
        """Close every session unused for serve.session_idle_s (on every tier; not one a turn holds). Blocks."""
        cutoff = time.monotonic() - self.config.session_idle_s
        idle = [s for s in self.rt.sessions() if s.used_at < cutoff and not s.busy]
        for session in idle:
            self.conversations.discard(session.id)
            with contextlib.suppress(ChatrtError):
                session.close()
        return len(idle)

    # -- replies out -------------------------------------------------------------------------------

    async def complete(self, answers: list[tuple[Session, AsyncTurn]], req: wire.ChatRequest,
                       tenant: Tenant) -> wire.ChatCompletion:  # fmt: skip
        """The whole reply, one choice per turn (they run together, batched by the engine)."""
        replies = await asyncio.gather(*(turn.result() for _, turn in answers))
        choices = []
        for k, reply in enumerate(replies):
            calls = reply.tool_calls
            choices.append(wire.Choice(
                index=k,
                message=wire.ReplyMessage(content=reply.text if reply.text or not calls else None,
                                          tool_calls=wire.tool_calls(calls)),
                finish_reason=wire.finish_reason(reply.stats.finish_reason, calls, named(answers[k][1])),
                logprobs=wire.choice_logprobs(self.rt.lm.tokenizer, reply.logprobs),
            ))  # fmt: skip
        first = replies[0].stats
        return wire.ChatCompletion(
            id=wire.completion_id(),
            created=wire.now(),
            model=self.model_id,
            choices=choices,
            usage=usage(first, sum(r.stats.generated_tokens for r in replies)),
            session_id=tenant.external(answers[0][0].id),
            chatrt=wire.TurnInfo.model_validate(first.model_dump()),
        )

    async def stream(self, answers: list[tuple[Session, AsyncTurn]], req: wire.ChatRequest,
                     tenant: Tenant) -> AsyncIterator[dict[str, str]]:  # fmt: skip
        """The reply as SSE events, each choice's pieces as they come (`index` says whose). The turns begin (and
        a bad request fails with its status) before the response does; a client that disconnects stops them,
        and each keeps what was sent as its reply. Tool calls go out whole, in one delta at the end: the text of a
        reply that may call tools is held back from where a call may begin, and a forced call's all along."""
        turns = [turn for _, turn in answers]
        firsts = await asyncio.gather(*(anext(turn, None) for turn in turns), return_exceptions=True)
        if failed := next((f for f in firsts if isinstance(f, BaseException)), None):
            for turn in turns:
                await turn.aclose()
            raise failed
        cid, created, session_id = wire.completion_id(), wire.now(), answers[0][0].id
        tooled = [turn.sync.tools for turn in turns]
        holds = [Holdback() if tools is not None and tools.free else None for tools in tooled]
        forced = [tools is not None and tools.forced is not None for tools in tooled]  # text held back all along
        held: list[list[TokenLogprob]] = [[] for _ in turns]  # logprobs of text not shown yet, per choice

        def shown(k: int, piece: str) -> str:
            """What of the piece the client sees now."""
            if isinstance(piece, Piece) and piece.logprobs is not None:
                held[k] += piece.logprobs
            hold = holds[k]
            return "" if forced[k] else hold.feed(piece) if hold is not None else piece

        def chunk(k: int, delta: wire.Delta, finish: str | None = None, use: wire.Usage | None = None) -> (
            dict[str, str]
        ):  # fmt: skip
            logprobs = None
            if delta.content and turns[k].sync.params.logprobs is not None:
                logprobs, held[k] = wire.choice_logprobs(self.rt.lm.tokenizer, held[k]), []
            choices = [] if use is not None else [
                wire.ChunkChoice(index=k, delta=delta, finish_reason=finish, logprobs=logprobs)]  # fmt: skip
            body = wire.ChatCompletionChunk(id=cid, created=created, model=self.model_id, choices=choices,
                                            usage=use, session_id=tenant.external(session_id))  # fmt: skip
            return {"data": body.model_dump_json(exclude_none=use is None)}

        async def finish(k: int) -> tuple[Reply, list[dict[str, str]]]:
            reply = await turns[k].result()  # finished: the recorded reply and its stats
            hold, out = holds[k], []
            rest = hold.rest(reply.text) if hold is not None else reply.text if forced[k] else ""
            if rest:  # what was held back and is text after all
                out.append(chunk(k, wire.Delta(content=rest)))
            if calls := wire.tool_calls(reply.tool_calls):
                deltas = [wire.DeltaToolCall(index=i, **c.model_dump()) for i, c in enumerate(calls)]
                out.append(chunk(k, wire.Delta(tool_calls=deltas)))
            reason = wire.finish_reason(reply.stats.finish_reason, reply.tool_calls, named(turns[k]))
            out.append(chunk(k, wire.Delta(), reason))
            return reply, out

        async def events() -> AsyncIterator[dict[str, str]]:
            reading: dict[asyncio.Future[str | None], int] = {}  # the next piece of each choice still going
            try:
                for k in range(len(turns)):
                    yield chunk(k, wire.Delta(role="assistant", content=""))
                replies: list[Reply] = []
                arrived = [(k, first) for k, first in enumerate(firsts)]
                while arrived or reading:
                    if not arrived:
                        done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
                        arrived = [(reading.pop(task), task.result()) for task in done]
                    k, piece = arrived.pop(0)
                    if piece is None:  # this choice has ended
                        reply, last = await finish(k)
                        replies.append(reply)
                        for event in last:
                            yield event
                        continue
                    if text := shown(k, piece):
                        yield chunk(k, wire.Delta(content=text))
                    reading[asyncio.ensure_future(anext(turns[k], None))] = k
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield chunk(0, wire.Delta(), use=usage(replies[0].stats, sum(r.stats.generated_tokens
                                                                                 for r in replies)))  # fmt: skip
                yield {"data": "[DONE]"}
            except ChatrtError as e:  # after the response started: the error is the stream's last event
                yield {"data": http_error(e).body().model_dump_json()}
            finally:
                for task in reading:
                    task.cancel()
                for turn in turns:
                    await turn.aclose()  # a disconnect lands here: each turn finishes on its own task

        return events()


async def expire_idle(server: Server) -> None:
    """Close idle sessions every so often (a quarter of serve.session_idle_s, 30 s at most)."""
    period = min(server.config.session_idle_s / 4, 30.0)
    while True:
        await asyncio.sleep(period)
        try:
            await asyncio.to_thread(server.expire)
        except Exception:  # a bug here must not stop the expiry for good
            log.exception("closing idle sessions failed")


def _abandon(opening: asyncio.Future[list[tuple[Session, AsyncTurn]]]) -> None:
    """Turns opened for a client that left before they were handed over: finish them unread (their sessions
    given back), on tasks of their own."""
    if not opening.cancelled() and opening.exception() is None:
        for _, turn in opening.result():
            _background.add(task := asyncio.ensure_future(turn.aclose()))
            task.add_done_callback(_background.discard)


_background: set[asyncio.Future[None]] = set()  # tasks nobody awaits, kept referenced until done


def usage(turn: TurnStats, generated: int | None = None) -> wire.Usage:
    """The turn's usage; `generated`: the tokens of all choices (the prompt is counted once, as OpenAI does)."""
    generated = turn.generated_tokens if generated is None else generated
    return wire.Usage(
        prompt_tokens=turn.prompt_tokens,
        completion_tokens=generated,
        total_tokens=turn.prompt_tokens + generated,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=turn.reused_tokens),
    )


def cache_scope(tenant: Tenant, user: str | None, cache_salt: str | None) -> str:
    """Whose conversations a request's may be matched to, and whose cached prefixes its session may start from:
    the tenant's, narrowed by the request's `user` or `cache_salt`."""
    return json.dumps([tenant.name, user, cache_salt])


REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": wire.ErrorResponse} for status in (400, 401, 404, 409, 413,
                                                                                                429, 503)}  # fmt: skip
BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": wire.ChatRequest,
    "/v1/sessions": wire.SessionRequest,
    "/v1/sessions/{session_id}/fork": wire.ForkRequest,
}
"""The request bodies the handlers parse themselves (to answer as OpenAI does), for the published schema."""


class RequestId:
    """`x-request-id` on every response: the client's own when it sent a sane one, else a new one (ASGI, so a
    streamed response is passed through as it is)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given if REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, sending)


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of the routes, with the bodies the handlers parse themselves (`BODIES`): generated from
    the same wire models that parse them."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title="chatrt", version=version("chatrt"), routes=app.routes,
                         description="OpenAI-compatible chat completions, with sessions")  # fmt: skip
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        schema["paths"][path]["post"]["requestBody"] = {"required": path != "/v1/sessions/{session_id}/fork",
                                                        "content": {"application/json": {"schema": ref}}}  # fmt: skip
    app.openapi_schema = schema
    return schema


def joined_system(messages: list[Message]) -> list[Message]:
    """The leading system (and developer) messages as one system prompt, their texts joined by a blank line:
    clients that send an instruction and a context as two system messages mean both."""
    n = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    if n < 2:
        return messages
    return [Message(role="system", content="\n\n".join(m.content for m in messages[:n])), *messages[n:]]


def _message(m: wire.WireMessage) -> Message:
    try:
        text = m.text()
    except ValueError as e:
        raise HTTPError(400, str(e), "invalid_request_error") from None
    calls = tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls or ())
    return Message(role="system" if m.role == "developer" else m.role, content=text, tool_calls=calls,
                   tool_call_id=m.tool_call_id)  # fmt: skip


def in_order(history: list[Message], asked: list[Message]) -> None:
    """400 naming messages when what a request asks cannot follow the conversation (a result of a call not made,
    one given twice, a user message before a call's result)."""
    if problem := order_problem([*history, *asked]):
        raise HTTPError(400, f"the messages are out of order: {problem}", "invalid_request_error", param="messages")


def wire_message(m: Message) -> dict[str, Any]:
    """A transcript message as OpenAI's messages carry it."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in wire.tool_calls(m.tool_calls) or ()]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def named(turn: AsyncTurn) -> bool:
    """Whether the turn forced a call of a function the client named."""
    use = turn.sync.tools
    return use is not None and use.forced is not None and use.forced.name is not None


def create_app(art: AsyncChatRuntime, config: ServeConfig) -> FastAPI:
    server = Server(art, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        expiring = asyncio.create_task(expire_idle(server)) if config.session_idle_s else None
        yield
        if expiring is not None:
            expiring.cancel()

    app = FastAPI(title="chatrt", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(RequestId)
    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(HTTPError)
    async def _http(_: Request, e: HTTPError) -> JSONResponse:
        return e.response()

    @app.exception_handler(ChatrtError)
    async def _chatrt(_: Request, e: ChatrtError) -> JSONResponse:
        return http_error(e).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:  # a bug: logged with its traceback, not sent
        log.exception("%s %s failed", request.method, request.url.path)
        return HTTPError(500, f"internal error ({type(e).__name__}); the server log has the details",
                         "server_error").response()  # fmt: skip

    @app.exception_handler(404)
    async def _missing(request: Request, _: Exception) -> JSONResponse:
        return HTTPError(404, f"no route {request.method} {request.url.path}", "not_found_error").response()

    @app.exception_handler(405)
    async def _method(request: Request, _: Exception) -> JSONResponse:
        return HTTPError(
            405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error"
        ).response()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        store = server.rt.store
        if store is not None:
            try:
                await asyncio.to_thread(store.ping)
            except StoreUnavailable as e:
                return HTTPError(503, f"Redis is not reachable: {e}", "overloaded_error", retry_after=1).response()
        ready = {"status": "ready", "model": server.model_id, "redis": "off" if store is None else "ok",
                 "decode_step": server.rt.engine.decode_step()}  # fmt: skip  # compiled, compiling, loading or eager
        if server.authorized(request):  # process details only for who holds the key
            ready["pid"] = os.getpid()
        return JSONResponse(ready)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={200: {"model": wire.ModelList}})
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        names = [server.model_id, *(a for a in config.model_aliases if a != server.model_id)]
        return wire.ModelList(data=[wire.ModelCard(id=name, created=wire.now()) for name in names]).model_dump()

    @app.post("/v1/chat/completions", response_model=None, responses=ERRORS | {200: {"model": wire.ChatCompletion}})
    async def chat(request: Request) -> dict[str, Any] | EventSourceResponse:
        tenant = server.authorize(request)
        req = await server.parse(request, wire.ChatRequest)
        if config.strict_model and req.model != server.model_id and req.model not in config.model_aliases:
            message = f"the model {req.model!r} is not served here; it serves {server.model_id!r} (GET /v1/models)"
            raise HTTPError(404, message, "invalid_request_error", "model_not_found", param="model")
        if unsupported := req.unsupported(server.rt.lm.info.vocab_size):
            param, message = unsupported
            raise HTTPError(400, message, "invalid_request_error", "unsupported_value", param=param)
        # tools and tool_choice checked (and refused) before any session is touched
        tool_use(req.tools, req.tool_choice, takes_tools=server.rt.template.takes_tools)
        header = request.headers.get(SESSION_HEADER)
        if (req.n or 1) > (most := server.rt.config.engine.max_batch):
            raise HTTPError(400, f"n is at most {most} here (engine.max_batch: the choices decode as one batch)",
                            "invalid_request_error", "unsupported_value", param="n")  # fmt: skip
        if (req.n or 1) > 1 and (header or req.session_id):
            raise HTTPError(400, "n > 1 is for stateless requests (each choice goes on as a session of its own): a "
                            "session holds one conversation; ask it once per reply", "invalid_request_error",
                            "unsupported_value", param="n")  # fmt: skip
        server.admit(tenant, req.n or 1)
        try:
            answers = await server.open_turns(req, header, tenant)
        except BaseException:
            server.release(tenant, req.n or 1)
            raise
        for _, t in answers:  # each counted out once its turn has finished
            t.sync.add_done_callback(lambda _: server.release(tenant))
        if not req.stream:
            try:
                return (await server.complete(answers, req, tenant)).model_dump()
            finally:
                for _, t in answers:
                    await t.aclose()
        events = await server.stream(answers, req, tenant)

        async def close() -> None:
            for _, t in answers:
                await t.aclose()

        # The background task runs after the response, however it ended: also when the client left before the
        # stream was ever iterated (then the events' own finally never runs).
        return EventSourceResponse(events, ping=15, background=BackgroundTask(close))

    @app.post("/v1/sessions")
    async def open_session(request: Request) -> dict[str, Any]:
        tenant = server.authorize(request)
        req = await server.parse(request, wire.SessionRequest)
        session = await asyncio.to_thread(server.open, tenant, req.system_prompt, session_id=req.session_id,
                                          messages=[_message(m) for m in req.messages])  # fmt: skip
        return {"session_id": tenant.external(session.id), "object": "session", "turns": session.turns}

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork_session(session_id: str, request: Request) -> dict[str, Any]:
        tenant = server.authorize(request)
        bodied = int(request.headers.get("content-length") or 0) or "transfer-encoding" in request.headers
        req = await server.parse(request, wire.ForkRequest) if bodied else wire.ForkRequest()
        parent = await art.session(tenant.internal(check_session_id(session_id)))
        child = await asyncio.to_thread(server.fork, tenant, parent.sync, req.session_id)
        return {"session_id": tenant.external(child.id), "object": "session", "turns": child.turns,
                "forked_from": session_id}  # fmt: skip

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        tenant = server.authorize(request)
        session = await art.session(tenant.internal(check_session_id(session_id)))
        return {
            "session_id": session_id,
            "object": "session",
            "system_prompt": session.sync.system_prompt,
            "messages": [wire_message(m) for m in session.sync.messages],
            "stats": session.stats().model_dump() | {"session_id": session_id},
        }

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
        tenant = server.authorize(request)
        internal = tenant.internal(check_session_id(session_id))
        session = await art.session(internal)  # here, or resumed from Redis to be closed everywhere
        server.conversations.discard(internal)
        await session.close()
        return {"session_id": session_id, "object": "session.deleted", "deleted": True}

    return app
