/**
 * The tree's layout (scripts/check-imports.js): every import runs daemon -> config -> vhost ->
 * virtqueue -> drivers -> block -> native, and no circle crosses folders. `npm test` also runs
 * the script itself before jest.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

// eslint-disable-next-line @typescript-eslint/no-var-requires
const { check, LAYERS } = require('../../scripts/check-imports.js') as {
  check(root: string): { files: number; problems: string[] };
  LAYERS: string[];
};

const root = path.join(__dirname, '..', '..');

function tree(files: Record<string, string>): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'rnull-layout-'));
  for (const [name, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(dir, name)), { recursive: true });
    fs.writeFileSync(path.join(dir, name), text);
  }
  return dir;
}

test('the top level shows the design card layers and no src/', () => {
  for (const layer of LAYERS) expect(fs.statSync(path.join(root, layer)).isDirectory()).toBe(true);
  expect(fs.existsSync(path.join(root, 'src'))).toBe(false);
  expect(fs.existsSync(path.join(root, 'native', 'index.ts'))).toBe(true);
  expect(fs.existsSync(path.join(root, 'native', 'addon.cc'))).toBe(true);
});

test('this tree: no upward import, no circle across folders', () => {
  const { files, problems } = check(root);
  expect(problems).toEqual([]);
  expect(files).toBeGreaterThan(30);
});

test('an upward import is found, type-only ones too', () => {
  const dir = tree({
    'native/index.ts': 'export const x = 1;\n',
    'block/disk.ts': "import { x } from '../native';\nexport const y = x;\n",
    'virtqueue/q.ts': "import type { Z } from '../vhost/m';\nexport type Q = Z;\n",
    'vhost/m.ts': "import { y } from '../block/disk';\nexport type Z = typeof y;\n",
  });
  const { problems } = check(dir);
  expect(problems).toHaveLength(1);
  expect(problems[0]).toMatch(/^virtqueue\/q\.ts: imports vhost\/m\.ts upward \(virtqueue -> vhost/);
});

test('a circle across folders is found; one inside a folder is allowed', () => {
  const dir = tree({
    'daemon/service.ts': "import { S } from './management/server';\nexport interface D { s: S }\n",
    'daemon/management/server.ts': "import type { D } from '../service';\nexport class S { d?: D }\n",
    'block/request.ts': "import type { H } from './hw-queue';\nexport interface R { h: H }\n",
    'block/hw-queue.ts': "import type { R } from './request';\nexport interface H { r: R }\n",
  });
  const { problems } = check(dir);
  expect(problems).toHaveLength(1);
  expect(problems[0]).toMatch(/^import circle: /);
  expect(problems[0]).toContain('daemon/service.ts');
  expect(problems[0]).toContain('daemon/management/server.ts');
  expect(problems[0]).not.toContain('block/');
});

test('a specifier naming no file of the tree is reported', () => {
  const dir = tree({ 'vhost/a.ts': "import { b } from './missing';\nexport const a = b;\n" });
  expect(check(dir).problems).toEqual(["vhost/a.ts: './missing' names no TypeScript file of the tree"]);
});
