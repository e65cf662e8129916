"""The evaluation plan: every (case, method, setting) row, in one fixed order, with a key that names it.

``--sweep METHOD.PARAM=V1,V2,...`` (repeatable) sweeps a parameter; several sweeps of one method combine as
a cartesian product, in the order given. A row's key is its case id, method and full parameter set (defaults
included), so a rerun recognises finished rows and a changed default is a new row.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass

from .methods import Method, get_method, parse_value


@dataclass(frozen=True)
class Setting:
    method: Method
    overrides: dict  # the swept parameters of this setting, {name: value}
    params: object  # the method's parameter dataclass with the overrides applied

    @property
    def label(self) -> str:
        """"ip2p image_guidance=1.5" (the method alone when nothing is swept)."""
        return " ".join([self.method.name] + [f"{k}={v}" for k, v in self.overrides.items()])

    def params_json(self) -> str:
        return json.dumps(dataclasses.asdict(self.params), sort_keys=True)


def parse_sweeps(items: list[str], methods: list[str]) -> dict[str, list[tuple[str, list]]]:
    """['ip2p.image_guidance=1,1.5'] -> {'ip2p': [('image_guidance', [1.0, 1.5])]}"""
    sweeps: dict[str, list[tuple[str, list]]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        method_name, dot, param = name.partition(".")
        if not sep or not dot or not values:
            raise ValueError(f"--sweep {item!r}: expected METHOD.PARAM=V1,V2,... e.g. ip2p.image_guidance=1.0,1.5")
        if method_name not in methods:
            get_method(method_name)  # an unknown name is named as such
            raise ValueError(f"--sweep {item!r}: method {method_name} is not evaluated; add --method {method_name}")
        method = get_method(method_name)
        parsed = [parse_value(method, param, v.strip()) for v in values.split(",") if v.strip()]
        if any(p == param for p, _ in sweeps.get(method_name, [])):
            raise ValueError(f"--sweep {item!r}: {method_name}.{param} is swept twice; give all its values at once")
        sweeps.setdefault(method_name, []).append((param, parsed))
    return sweeps


def settings(method_name: str, sweeps: dict[str, list[tuple[str, list]]]) -> list[Setting]:
    method = get_method(method_name)
    swept = sweeps.get(method_name, [])
    names = [name for name, _ in swept]
    combos = itertools.product(*[values for _, values in swept]) if swept else [()]
    out = []
    for combo in combos:
        overrides = dict(zip(names, combo))
        out.append(Setting(method, overrides, dataclasses.replace(method.params(), **overrides)))
    return out


def row_key(case_id: str, setting: Setting, seed: int) -> str:
    return f"{case_id}|{setting.method.name}|{setting.params_json()}|seed={seed}"


def plan(cases: list, methods: list[str], sweeps: dict, seed: int) -> list[tuple[object, Setting, str]]:
    """[(case, setting, key)] case-major: for each case, each method in the order given, each setting."""
    if len(set(methods)) != len(methods):
        raise ValueError(f"--method repeats a method: {methods}")
    all_settings = [s for name in methods for s in settings(name, sweeps)]
    return [(case, s, row_key(case.id, s, seed)) for case in cases for s in all_settings]
