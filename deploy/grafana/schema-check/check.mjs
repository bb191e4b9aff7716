#!/usr/bin/env node
// Type-checks Grafana dashboard JSON files against Grafana's published @grafana/schema types.
//
//   node check.mjs [--allowlist FILE] DASHBOARD.json...
//
// Each dashboard becomes a TypeScript module `export const dashboard = (<the JSON>) satisfies
// Dashboard;` (Dashboard from dashboard-types.ts), and `tsc --noEmit` (strict) checks them all:
// an object literal checked with `satisfies` gets TypeScript's excess-property check, so a
// misspelled or unknown field is an error, not a silently ignored key. Fields listed in the
// allowlist (default: allowlist.json beside this script) are removed before the check; an entry
// that matches nothing in the dashboards it names is an error too, so the list cannot go stale.
//
// Exit status: 0 every dashboard type-checks, 1 type errors or a stale allowlist entry,
// 2 bad arguments, unreadable files or no TypeScript installed (run `npm ci` here first).

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const TSC = join(HERE, 'node_modules', 'typescript', 'bin', 'tsc');
const SCHEMA_PACKAGE = join(HERE, 'node_modules', '@grafana', 'schema', 'package.json');
const TS_PACKAGE = join(HERE, 'node_modules', 'typescript', 'package.json');

/** A problem that stops the check before any type is checked (exit status 2). */
class SetupError extends Error {}

function usage(message) {
  throw new SetupError(`${message}\nusage: node check.mjs [--allowlist FILE] DASHBOARD.json...`);
}

function parseArgs(argv) {
  let allowlist = join(HERE, 'allowlist.json');
  const files = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--allowlist') {
      if (i + 1 >= argv.length) usage('--allowlist needs a file');
      allowlist = argv[++i];
    } else if (argv[i].startsWith('-')) {
      usage(`unknown option ${argv[i]}`);
    } else {
      files.push(argv[i]);
    }
  }
  if (files.length === 0) usage('no dashboard files given');
  return { allowlist, files };
}

function readJson(path, what) {
  let text;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new SetupError(`cannot read ${what} ${path}: ${err.message}`);
  }
  try {
    return { text, value: JSON.parse(text) };
  } catch (err) {
    throw new SetupError(`${what} ${path} is not valid JSON: ${err.message}`);
  }
}

/** Allowlist entries: {"dashboards": ["*" | file name, ...], "path": "a.*.b", "reason": "..."}. */
function loadAllowlist(path) {
  const { value } = readJson(path, 'allowlist');
  const entries = value?.allowed;
  if (!Array.isArray(entries)) {
    throw new SetupError(`allowlist ${path} must be an object with an "allowed" list`);
  }
  entries.forEach((entry, i) => {
    const ok =
      entry &&
      Array.isArray(entry.dashboards) &&
      entry.dashboards.length > 0 &&
      entry.dashboards.every((d) => typeof d === 'string' && d.length > 0) &&
      typeof entry.path === 'string' &&
      entry.path.length > 0 &&
      typeof entry.reason === 'string' &&
      entry.reason.trim().length > 0 &&
      Object.keys(entry).every((k) => ['dashboards', 'path', 'reason'].includes(k));
    if (!ok) {
      throw new SetupError(
        `allowlist ${path} entry ${i} must have exactly "dashboards" (non-empty list), ` +
          '"path" and a non-empty "reason"',
      );
    }
  });
  return entries;
}

/** Deletes every field at `segments` ("*" = any key or index); returns how many were deleted. */
function removePath(node, segments) {
  if (node === null || typeof node !== 'object' || segments.length === 0) return 0;
  const [head, ...rest] = segments;
  const keys = head === '*' ? Object.keys(node) : Object.hasOwn(node, head) ? [head] : [];
  let removed = 0;
  for (const key of keys) {
    if (rest.length === 0) {
      if (Array.isArray(node)) continue; // only object fields can be allowed, not list items
      delete node[key];
      removed += 1;
    } else {
      removed += removePath(node[key], rest);
    }
  }
  return removed;
}

/** Runs the check; returns the exit status. */
function check() {
  const { allowlist: allowlistPath, files } = parseArgs(process.argv.slice(2));
  if (!existsSync(TSC) || !existsSync(SCHEMA_PACKAGE)) {
    throw new SetupError(`TypeScript or @grafana/schema not installed in ${HERE}: run \`npm ci\` there`);
  }
  const allowlist = loadAllowlist(allowlistPath);
  const matches = allowlist.map(() => ({ considered: 0, removed: 0 }));

  mkdirSync(join(HERE, '.wrappers'), { recursive: true });
  const workDir = mkdtempSync(join(HERE, '.wrappers', 'run-'));
  const wrapperToSource = new Map();
  const notes = [];
  try {
    const wrappers = files.map((file, index) => {
      const source = resolve(file);
      const { text, value } = readJson(source, 'dashboard');
      const name = basename(source);
      let body = text.trimEnd();
      allowlist.forEach((entry, i) => {
        if (!entry.dashboards.includes('*') && !entry.dashboards.includes(name)) return;
        matches[i].considered += 1;
        matches[i].removed += removePath(value, entry.path.split('.'));
      });
      if (JSON.stringify(value) !== JSON.stringify(JSON.parse(text))) {
        body = JSON.stringify(value, null, 2);
        notes.push(`${file}: allowlisted fields removed, line numbers refer to the JSON without them`);
      }
      const wrapper = `${String(index).padStart(3, '0')}-${name.replace(/[^A-Za-z0-9_.-]/g, '_')}.ts`;
      // The JSON starts on the wrapper's first line, so tsc's line numbers are the file's own.
      const prefix =
        "import type { Dashboard } from '../../dashboard-types.ts'; export const dashboard = (";
      writeFileSync(join(workDir, wrapper), `${prefix}${body}) satisfies Dashboard;\n`);
      wrapperToSource.set(wrapper, file);
      return wrapper;
    });
    writeFileSync(
      join(workDir, 'tsconfig.json'),
      JSON.stringify({ extends: '../../tsconfig.json', files: wrappers }, null, 2),
    );

    const tsc = spawnSync(process.execPath, [TSC, '--project', join(workDir, 'tsconfig.json'), '--pretty', 'false'], {
      cwd: HERE,
      encoding: 'utf8',
    });
    if (tsc.error) throw new SetupError(`cannot run tsc: ${tsc.error.message}`);
    let output = `${tsc.stdout}${tsc.stderr}`;
    const relDir = relative(HERE, workDir);
    for (const [wrapper, file] of wrapperToSource) {
      output = output.split(join(relDir, wrapper)).join(file);
    }

    const stale = allowlist
      .map((entry, i) => ({ entry, ...matches[i] }))
      .filter((m) => m.considered > 0 && m.removed === 0);
    for (const { entry } of stale) {
      console.error(
        `stale allowlist entry (matches nothing in ${entry.dashboards.join(', ')}): ${entry.path}`,
      );
    }

    const schemaVersion = JSON.parse(readFileSync(SCHEMA_PACKAGE, 'utf8')).version;
    const tsVersion = JSON.parse(readFileSync(TS_PACKAGE, 'utf8')).version;
    const against = `@grafana/schema ${schemaVersion}, TypeScript ${tsVersion} (strict)`;
    if (tsc.status !== 0) {
      process.stdout.write(output.endsWith('\n') || output === '' ? output : `${output}\n`);
      for (const note of notes) console.error(`note: ${note}`);
      console.error(`FAILED: ${files.length} dashboard(s) against ${against}`);
      return 1;
    }
    if (stale.length > 0) {
      console.error(`FAILED: stale allowlist entries in ${allowlistPath}`);
      return 1;
    }
    console.log(`OK: ${files.length} dashboard(s) type-check against ${against}`);
    return 0;
  } finally {
    rmSync(workDir, { recursive: true, force: true });
  }
}

try {
  process.exitCode = check();
} catch (err) {
  console.error(err instanceof SetupError ? `error: ${err.message}` : err);
  process.exitCode = 2;
}
