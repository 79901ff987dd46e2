"""A leaner mitmproxy: its addon package without its __init__, per-request costs that
buy sandgate nothing taken out, and hooks dispatched only to the addons that have them.

Import this before any mitmproxy module. `mitmproxy/addons/__init__.py` imports all
~30 default addons (a Flask app for onboarding, ldap3 for proxy auth, ...): about
270 ms of the ~740 ms that importing the gateway takes, for addons sandgate never
loads. With the package registered without its __init__ (proxy/lean_import.py),
`import mitmproxy.addons.core` loads just that module.

`drop_per_request_checks()` (called by the engine once mitmproxy is imported) takes
out what py-spy showed on the gateway's event loop under bench_gateway.py's
inspected rows, ~10-15 % of its Python time per keep-alive request (on-CPU profile;
docs/performance.md has the numbers):

- `MessageData.__post_init__` (mitmproxy/http.py, defined only `if __debug__`)
  type-checks every field of every Request and Response with `typing`
  introspection. They come from mitmproxy's own HTTP/1 parser, whose types are
  right; the check catches addon authors' mistakes, and sandgate's addon builds no
  message. (`python -O` drops it too, but with every assert in every package.)
- `asyncio_utils.set_task_debug_info` looks up PYTEST_CURRENT_TEST in os.environ
  for every task mitmproxy starts (a failed lookup, so a KeyError raised and
  caught inside `Mapping.get`), to put a test's name into the task's name.
- `Hook.args` calls `dataclasses.fields()` for every hook it dispatches; a hook
  class's fields never change, so their names are cached per class.

`dispatch_hooks_directly()` replaces `AddonManager.handle_lifecycle`, through which
every hook of every connection goes (about 20 per inspected connection, 4 per
request): mitmproxy walks the whole addon chain for each (a generator per addon, a
`safecall` context manager, a coroutine, `getattr`), then does it all again with an
`update` hook for every flow hook, which none of the gateway's addons has. The
replacement keeps, per hook name, the addons that have it (until the chain
changes), calls each in chain order with the same error handling (an exception
logged and the next addon called, AddonHalt stops), and skips `update` when no
addon has it.

`unblock_unhandled_hooks(addons)` (called by the engine once its addons are added):
a layer that yields a hook (`StartHook`, blocking) pauses until the hook has run:
the connection handler starts a task for it, dispatches it, and sends a
`HookCompleted` event back down the layer stack, which resumes the layer. For hooks
none of the gateway's addons has (`response`, `tls_established_client`/`_server`,
`error`, ...) all of that is for nothing: made non-blocking, the layer goes on at
once (the task still runs and finds no addon).

docs/mitmproxy-internals.md lists these for the upgrade checklist.
"""

from __future__ import annotations

import inspect
import time
import types

from sandgate.proxy.lean_import import skip_init

skip_init("mitmproxy.addons")

_HOOK_FIELDS: dict[type, tuple[str, ...]] = {}


def drop_per_request_checks() -> None:
    """Patch the three costs above out of the imported mitmproxy (idempotent)."""
    from mitmproxy import hooks, http
    from mitmproxy.utils import asyncio_utils

    http.MessageData.__post_init__ = _no_type_check
    asyncio_utils.set_task_debug_info = _set_task_name
    hooks.Hook.args = _hook_args


def _no_type_check(self) -> None:
    """The dataclass __init__ of Request/ResponseData calls this: nothing to check."""


def _set_task_name(task, *, name: str, client: tuple | None = None) -> None:
    """`asyncio_utils.set_task_debug_info` without the environment lookup."""
    task.created = time.time()
    task.set_name(name)
    if client:
        task.client = client


def _hook_args(self) -> list:
    """`Hook.args`: the hook's field values in order, field names cached per class."""
    names = _HOOK_FIELDS.get(type(self))
    if names is None:
        import dataclasses

        names = _HOOK_FIELDS[type(self)] = tuple(f.name for f in dataclasses.fields(self))
    return [getattr(self, name) for name in names]


def dispatch_hooks_directly() -> None:
    """Replace `AddonManager.handle_lifecycle` (see the module docstring; idempotent)."""
    from mitmproxy import addonmanager, exceptions, flow

    async def trigger(manager, name: str, args: list) -> None:
        for addon in hook_handlers(manager, name):
            try:
                result = getattr(addon, name)(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # noqa: BLE001 - as mitmproxy's safecall: log, go on
                addonmanager.logger.error(f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event) -> None:
        args = event.args()
        await trigger(self, event.name, args)
        if isinstance(args[0], flow.Flow) and hook_handlers(self, "update"):
            await trigger(self, "update", [[args[0]]])

    addonmanager.AddonManager.handle_lifecycle = handle_lifecycle


def hook_handlers(manager, name: str) -> tuple:
    """The addons of an AddonManager (children included, in mitmproxy's order) with a
    callable hook `name`, cached until the chain changes (`add` appends to the list,
    `remove` and `clear` replace it)."""
    cache = manager.__dict__.get("_sandgate_hook_handlers")
    if cache is None or cache[0] is not manager.chain or cache[1] != len(manager.chain):
        cache = manager._sandgate_hook_handlers = (manager.chain, len(manager.chain), {})
    found = cache[2].get(name)
    if found is None:
        from mitmproxy.addonmanager import traverse

        found = cache[2][name] = tuple(
            addon
            for addon in traverse(manager.chain)
            if callable(hook := getattr(addon, name, None))
            and not isinstance(hook, types.ModuleType)
        )
    return found


def unblock_unhandled_hooks(manager) -> list[str]:
    """Make each layer hook that no addon of `manager` (the AddonManager, its addon
    set final) has non-blocking; returns their names (see the module docstring)."""
    from mitmproxy import hooks
    from mitmproxy.proxy import commands

    unblocked = []
    for name, hook_class in hooks.all_hooks.items():
        if issubclass(hook_class, commands.StartHook) and not hook_handlers(manager, name):
            hook_class.blocking = False
            unblocked.append(name)
    return unblocked
