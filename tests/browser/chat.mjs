// Drives the chat page in headless Chromium (playwright-core) for tests/tests/browser.rs.
//
// Env: PAGE_URL (with ?prompt=...&send=1&temperature=0&max_tokens=N), SCREENSHOT (PNG path),
// TIMEOUT_MS, CHROMIUM (default /usr/bin/chromium), PAUSE_AT_TOKENS (optional: once the reply
// has that many tokens, print `PAUSE <route peers>` and wait for a line on stdin before going on;
// the test kills a server meanwhile).
//
// Prints `TOKENS <n>` as the reply grows, and finally one line `RESULT <json>`.
import { launch } from "./launch.mjs";
import { createInterface } from "node:readline";

const url = process.env.PAGE_URL;
const timeout = Number(process.env.TIMEOUT_MS || 300000);
const pauseAt = process.env.PAUSE_AT_TOKENS ? Number(process.env.PAUSE_AT_TOKENS) : null;
const stdin = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => stdin.once("line", resolve));

const browser = await launch();
const result = { console: [] };
let page;
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on("console", (m) => result.console.push(`${m.type()}: ${m.text()}`.slice(0, 500)));
  page.on("pageerror", (e) => result.console.push(`pageerror: ${e.message}`.slice(0, 500)));
  const started = Date.now();
  await page.goto(url);
  const reply = page.locator('[data-testid="assistant-message"]').last();
  await reply.waitFor({ timeout });
  result.first_reply_element_ms = Date.now() - started;
  let seen = -1;
  let paused = pauseAt === null;
  for (;;) {
    const done = await reply.getAttribute("data-done");
    const tokens = (await reply.getAttribute("data-tokens")) || "";
    const n = tokens ? tokens.split(",").length : 0;
    if (n !== seen) {
      console.log(`TOKENS ${n}`);
      seen = n;
    }
    if (!paused && n >= pauseAt) {
      const peers = await page.locator('[data-testid="route"] tbody tr td:first-child').allTextContents();
      console.log(`PAUSE ${peers.join(" ")}`);
      await nextLine();
      paused = true;
    }
    if (done === "true") break;
    if (Date.now() - started > timeout) throw new Error(`no complete reply within ${timeout} ms`);
    await page.waitForTimeout(50);
  }
  result.total_ms = Date.now() - started;
  result.tokens = ((await reply.getAttribute("data-tokens")) || "").split(",").filter((t) => t).map(Number);
  result.error = (await reply.getAttribute("data-error")) === "true";
  result.text = await reply.locator(".text").textContent();
  result.device = await page.locator('[data-testid="compute-device"]').textContent();
  result.status = await page.locator('[data-testid="status"]').textContent();
  result.ttft = await page.locator('[data-testid="ttft"]').textContent();
  result.tokens_per_s = await page.locator('[data-testid="tokens-per-s"]').textContent();
  result.route = await page.locator('[data-testid="route"] tbody tr td:first-child').allTextContents();
  result.verify = await page.locator('[data-testid="verify"]').textContent();
  const spec = page.locator('[data-testid="speculation"]');
  result.speculation = {
    steps: Number(await spec.getAttribute("data-steps")),
    drafted: Number(await spec.getAttribute("data-drafted")),
    accepted: Number(await spec.getAttribute("data-accepted")),
  };
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
} catch (e) {
  result.failure = String(e && e.stack ? e.stack : e);
  if (page) {
    result.status = await page.locator('[data-testid="status"]').textContent().catch(() => null);
    if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true }).catch(() => {});
  }
} finally {
  await browser.close();
}
console.log(`RESULT ${JSON.stringify(result)}`);
process.exit(0);
