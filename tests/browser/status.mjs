// Loads the chat page in headless Chromium (playwright-core) for tests/tests/browser.rs and
// waits until its status starts with WAIT_STATUS: "Error:" (the default) where the page must
// give up (a tampered bundle, a private swarm without its key), "Ready:" where it must have
// listed the models and loaded a checked bundle. Reports what it shows and what it cached.
//
// Env: PAGE_URL, WAIT_STATUS, SCREENSHOT (PNG path), TIMEOUT_MS, CHROMIUM (default
// /usr/bin/chromium).
//
// Prints one line `RESULT <json>`: status, send_disabled, assistant_messages, models (the model
// picker's option texts), cached (the URLs of the bundle cache's entries), console.
import { launch } from "./launch.mjs";

const url = process.env.PAGE_URL;
const timeout = Number(process.env.TIMEOUT_MS || 300000);
const waitStatus = process.env.WAIT_STATUS || "Error:";

const browser = await launch();
const result = { console: [] };
let page;
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on("console", (m) => result.console.push(`${m.type()}: ${m.text()}`.slice(0, 1000)));
  page.on("pageerror", (e) => result.console.push(`pageerror: ${e.message}`.slice(0, 1000)));
  await page.goto(url);
  await page.waitForFunction(
    (prefix) => (document.querySelector('[data-testid="status"]')?.textContent || "").startsWith(prefix),
    waitStatus,
    { timeout },
  );
  // Give a page that would carry on anyway the time to do so.
  await page.waitForTimeout(1000);
  result.status = await page.locator('[data-testid="status"]').textContent();
  result.send_disabled = await page.locator('[data-testid="send"]').isDisabled();
  result.assistant_messages = await page.locator('[data-testid="assistant-message"]').count();
  result.models = await page.locator('[data-testid="model-picker"] option').allTextContents();
  result.cached = await page.evaluate(async () => {
    const names = await caches.keys();
    const urls = [];
    for (const name of names) {
      const cache = await caches.open(name);
      for (const request of await cache.keys()) urls.push(`${name} ${request.url}`);
    }
    return urls;
  });
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
