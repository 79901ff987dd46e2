"""`sandgate demo`: the whole product on a fake internet in namespaces."""

from __future__ import annotations

from sandgate.enforcer.cli.common import setup_errors


def register(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="build a fake internet in namespaces and run a scripted agent through the gateway",
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    with setup_errors():
        from sandgate.enforcer.demo import demo
        from sandgate.enforcer.run import check_prerequisites

        check_prerequisites("demo")
        return demo()
