"""`repsim cache`: the activation store, listed, inspected, verified and pruned (no model code is imported)."""

from __future__ import annotations

import argparse
import json

from repsim.activations.store import Store, human_size, parse_size
from repsim.system.errors import UserError


def _say_skipped(store: Store) -> None:
    for key in store.skipped:
        print(f"skipped {key}: a running extraction holds its lock (run again when it has finished)")


def run_cache(args: argparse.Namespace) -> int:
    """`repsim cache list|info|rm|prune` ."""
    store = Store()
    action = args.cache_action
    if action == "list" or action is None:
        entries = store.entries(include_partial=True)
        if store.reclaimed:
            print(f"deleted {human_size(store.reclaimed)} left by an interrupted removal")
        if not entries:
            print(f"no cached activations in {store.root}")
            return 0
        for e in entries:
            print(e.row())
        print(f"{len(entries)} entries, {human_size(sum(e.size_bytes for e in entries))} in {store.root}")
        return 0
    if action == "info":
        info = store.info(args.key, verify=args.verify)
        if args.json:
            print(json.dumps(info, indent=1, default=str))
        elif "meta" not in info:
            print(f"key       {info['key']}\npath      {info['path']}\nsize      {human_size(info['size_bytes'])}")
        else:
            meta = info.get("meta", {})
            print(f"key       {info['key']}\npath      {info['path']}\nsize      {human_size(info['size_bytes'])}")
            print(f"created   {info.get('created')}")
            for k in ("model", "revision", "data", "data_fingerprint", "n_texts", "pool", "max_length",
                      "n_truncated", "dtype", "final_norm", "transformers"):
                print(f"{k:<17} {meta.get(k)}")
            print(f"built with        {info.get('built_with')}")
            print(f"layers    {info.get('layers')} widths {sorted(set(info.get('widths', {}).values()))}")
        if "verified" in info and not args.json:
            print("checksums OK" if info["verified"] else
                  "DAMAGED: " + "; ".join(info["problems"]) + " (rebuilt automatically on its next use)")
        return 0 if info.get("verified", True) else 1
    if action == "rm":
        if args.all:
            removed = store.rm_all()
            _say_skipped(store)
            print(f"removed {len(removed)} entries from {store.root}")
            return 0
        if not args.keys:
            raise UserError("name the entries to remove (keys or prefixes from `repsim cache list`) or use --all")
        for key in args.keys:
            print(f"removed {store.rm(key)}")
        return 0
    if action == "prune":
        if args.older_than is None and args.max_size is None:
            raise UserError("prune needs --older-than DAYS and/or --max-size SIZE")
        removed = store.prune(args.older_than, parse_size(args.max_size) if args.max_size else None,
                              dry_run=args.dry_run)
        for e in removed:
            print(("would remove " if args.dry_run else "removed ") + e.key)
        _say_skipped(store)
        left = store.total_size() - (sum(e.size_bytes for e in removed) if args.dry_run else 0)
        would = "would be " if args.dry_run else ""
        print(f"{len(removed)} entries {would}removed; {human_size(left)} {would}left in {store.root}")
        return 0
    raise UserError(f"unknown cache action {action!r}")
