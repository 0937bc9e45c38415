// Loads the chat page in headless Chromium (playwright-core) for tests/tests/browser.rs and
// waits until it is ready to chat (its status starts with "Ready:"): the swarm's models were
// listed and the chosen model's client bundle loaded and checked.
//
// Env: PAGE_URL, SCREENSHOT (PNG path), TIMEOUT_MS, CHROMIUM (default /usr/bin/chromium).
//
// Prints one line `RESULT <json>`: status, models (the model picker's option texts), console.
import { launch } from "./launch.mjs";

const url = process.env.PAGE_URL;
const timeout = Number(process.env.TIMEOUT_MS || 300000);

const browser = await launch();
const result = { console: [] };
let page;
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on("console", (m) => result.console.push(`${m.type()}: ${m.text()}`.slice(0, 1000)));
  page.on("pageerror", (e) => result.console.push(`pageerror: ${e.message}`.slice(0, 1000)));
  await page.goto(url);
  await page.waitForFunction(
    () => (document.querySelector('[data-testid="status"]')?.textContent || "").startsWith("Ready:"),
    null,
    { timeout },
  );
  result.status = await page.locator('[data-testid="status"]').textContent();
  result.models = await page.locator('[data-testid="model-picker"] option').allTextContents();
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
