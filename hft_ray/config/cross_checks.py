"""Problems between keys of a pipeline file, found on the raw data so that they are listed
beside the schema's own errors (hft_ray/config/spec.py)."""

from __future__ import annotations

from hft_ray.config.sources import is_harness

RESERVED = ("pretrain", "bases")  # a base's worker group; the base rows beside the branches' (run/results.py)


def cross_problems(data: dict) -> list[str]:
    """Problems between keys, found on the raw data so they are listed beside schema errors."""
    problems = []
    domains = data.get("domains") if isinstance(data.get("domains"), dict) else {}
    for index, stage in enumerate(data.get("stages") or []):
        if isinstance(stage, dict) and "domain" in stage and stage["domain"] not in domains:
            problems.append(f"stages.{index}.domain: {stage['domain']!r} is not a domain; "
                            f"domains: {', '.join(domains) or '(none)'}")
        elif isinstance(stage, dict) and is_harness(domains.get(stage.get("domain"))):
            problems.append(f"stages.{index}.domain: {stage['domain']!r} is an lm-evaluation-harness column, "
                            "evaluated after every stage and never trained; train on another domain")
    methods = data.get("methods") if isinstance(data.get("methods"), dict) else {}
    dpo = [i for i, s in enumerate(data.get("stages") or []) if isinstance(s, dict) and s.get("kind") == "dpo"]
    for name, method in methods.items():
        if isinstance(method, dict) and method.get("kind") == "joint" and dpo:
            problems.append(f"methods.{name}: kind joint mixes SFT data and cannot train the DPO stages "
                            f"(stages {', '.join(map(str, dpo))}); drop the method or those stages")
    pretrain = data.get("pretrain")
    if isinstance(pretrain, dict):
        for index, name in enumerate(pretrain.get("domains") or []):
            if name not in domains:
                problems.append(f"pretrain.domains.{index}: {name!r} is not a domain; "
                                f"domains: {', '.join(domains) or '(none)'}")
            elif is_harness(domains[name]):
                problems.append(f"pretrain.domains.{index}: {name!r} is an lm-evaluation-harness column, never "
                                "trained; pretrain on another domain")
    for name in methods:
        if name in RESERVED or "@" in str(name):
            problems.append(f"methods.{name}: a name hft-ray uses itself ({', '.join(RESERVED)}, or with '@', "
                            "which names a method's seed); rename the method")
    compare_to = data.get("compare_to")
    if compare_to is not None and compare_to not in methods:
        problems.append(f"compare_to: {compare_to!r} is not a method; methods: {', '.join(methods) or '(none)'}")
    return problems
