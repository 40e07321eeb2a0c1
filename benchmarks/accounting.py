"""Where served/limit goes: a served configuration's CPU, party by party, against its in-process limit.

For one configuration, from the medians of its measured runs at the top user count on the payload set
of its limit (each run's cores from ``benchmarks.cpu_window``) and of its in-process limits (``benchmarks.limit``,
which records the cores its processes kept busy):

* ``share`` = the cores the served workers got ÷ the cores the limit's processes used;
* ``efficiency`` = the limit's CPU per image ÷ the served workers' CPU per image (what TorchServe's
  Python, the handler's request and response work, and sharing the cores cost the workers per image);
* ``share × efficiency`` = served ÷ limit (an identity: the cores cancel);
* what the rest of the machine's cores did during the runs: TorchServe's Java frontend, the load
  generator (locust), other processes and the hypervisor's steal, idle;
* ``ceiling``: the img/s all the machine's cores would serve at the measured CPU per image of the
  workers, the frontend and locust together, were no core ever idle, ÷ the limit -- the most served/limit
  can reach while the frontend and the load generator share the machine; ``ceiling_server_only``: the
  same without locust's CPU (a load generator on another machine).
"""
from __future__ import annotations

import statistics


def accounting(result: dict, *, top: int, set_name: str) -> dict | None:
    """The accounting of one configuration's result (``benchmarks.sitting``) at ``top`` users on ``set_name``
    (the set its limit ran on); None without a limit with cores or without measured runs with a CPU window."""
    runs = [r for r in result.get("runs", []) if r.get("set") == set_name and r.get("users") == top
            and r.get("phase") == "measure" and r.get("cpu")]
    limits = [x for x in result.get("limits") or [] if x.get("cores")]
    if not runs or not limits or not result.get("limit_img_s"):
        return None
    served = statistics.median(r["img_s"] for r in runs)
    if served <= 0:
        return None
    limit = result["limit_img_s"]

    def cores(k):
        return statistics.median(r["cpu"][f"{k}_cores"] for r in runs)
    workers, frontend, locust, busy = cores("workers"), cores("frontend"), cores("locust"), cores("machine_busy")
    machine = runs[0]["cpu"]["cores"]
    limit_cores = statistics.median(x["cores"] for x in limits)
    ms = {"limit": 1000 * limit_cores / limit, "workers": 1000 * workers / served,
          "frontend": 1000 * frontend / served, "locust": 1000 * locust / served}
    return {"served_img_s": served, "limit_img_s": limit, "served/limit": served / limit,
            "machine_cores": machine, "limit_cores": limit_cores, "workers_cores": workers,
            "frontend_cores": frontend, "locust_cores": locust,
            "other_cores": max(0.0, busy - workers - frontend - locust), "idle_cores": max(0.0, machine - busy),
            "ms_per_image": ms, "share": workers / limit_cores, "efficiency": ms["limit"] / ms["workers"],
            "ceiling": 1000 * machine / (ms["workers"] + ms["frontend"] + ms["locust"]) / limit,
            "ceiling_server_only": 1000 * machine / (ms["workers"] + ms["frontend"]) / limit}


def accounting_table(results: list[dict], *, top: int, set_name: str) -> tuple[str, dict[str, dict]]:
    """The Markdown table of every configuration with an accounting, and the accountings by name."""
    rows = {r["name"]: a for r in results if (a := accounting(r, top=top, set_name=set_name))}
    lines = ["| configuration | served/limit | = share of the limit's cores | × efficiency (limit ÷ workers, "
             "ms CPU/img) | frontend cores (ms/img) | locust cores (ms/img) | other + idle cores | ceiling: no idle core "
             "| ceiling: locust elsewhere |", "|---|---|---|---|---|---|---|---|---|"]
    for name, a in rows.items():
        ms = a["ms_per_image"]
        lines.append(f"| {name} | {a['served/limit']:.2f} | {a['share']:.2f} ({a['workers_cores']:.2f} of "
                     f"{a['limit_cores']:.2f}) | {a['efficiency']:.2f} ({ms['limit']:.2f} ÷ {ms['workers']:.2f}) | "
                     f"{a['frontend_cores']:.2f} ({ms['frontend']:.2f}) | {a['locust_cores']:.2f} ({ms['locust']:.2f}) | "
                     f"{a['other_cores']:.2f} + {a['idle_cores']:.2f} of {a['machine_cores']} | {a['ceiling']:.2f} | "
                     f"{a['ceiling_server_only']:.2f} |")
    return "\n".join(lines), rows
