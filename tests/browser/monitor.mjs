// Opens the page's Monitor view (`?view=monitor`) in headless Chromium for tests/tests/browser.rs:
// waits until the first model shows healthy with SERVERS servers online, takes a screenshot,
// prints `PAUSE healthy` and waits for a line on stdin (the test kills a server), then waits
// until the model shows broken and takes another.
//
// Env: PAGE_URL, SERVERS, SCREENSHOT_HEALTHY, SCREENSHOT_BROKEN (PNG paths), TIMEOUT_MS,
// CHROMIUM (default /usr/bin/chromium).
//
// Prints one line `RESULT <json>`: `healthy` and `broken`, each what the view showed (health,
// per-block server counts, the servers' rows), and console.
import { createInterface } from "node:readline";
import { launch } from "./launch.mjs";

const url = process.env.PAGE_URL;
const servers = Number(process.env.SERVERS || 1);
const timeout = Number(process.env.TIMEOUT_MS || 120000);
const stdin = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => stdin.once("line", resolve));

const browser = await launch();
const result = { console: [] };
let page;
const shown = () =>
  page.evaluate(() => {
    const m = document.querySelector('[data-testid="monitor-model"]');
    if (!m) return null;
    return {
      healthy: m.dataset.healthy === "true",
      health: m.querySelector('[data-testid="monitor-health"]')?.textContent,
      blocks: [...m.querySelectorAll('[data-testid="coverage"] span')].map((s) => Number(s.dataset.servers)),
      servers: [...m.querySelectorAll('[data-testid="monitor-server"]')].map((r) => ({
        peer: r.dataset.peer,
        state: r.dataset.state,
        text: r.textContent,
      })),
      status: document.querySelector('[data-testid="monitor-status"]')?.textContent,
    };
  });
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.on("console", (m) => result.console.push(`${m.type()}: ${m.text()}`.slice(0, 1000)));
  page.on("pageerror", (e) => result.console.push(`pageerror: ${e.message}`.slice(0, 1000)));
  await page.goto(url);
  await page.waitForFunction(
    (n) => {
      const m = document.querySelector('[data-testid="monitor-model"]');
      return (
        m &&
        m.dataset.healthy === "true" &&
        m.querySelectorAll('[data-testid="monitor-server"][data-state="online"]').length === n
      );
    },
    servers,
    { timeout },
  );
  result.healthy = await shown();
  await page.screenshot({ path: process.env.SCREENSHOT_HEALTHY, fullPage: true });
  console.log("PAUSE healthy");
  await nextLine();
  await page.waitForFunction(
    () => document.querySelector('[data-testid="monitor-model"]')?.dataset.healthy === "false",
    null,
    { timeout },
  );
  result.broken = await shown();
  await page.screenshot({ path: process.env.SCREENSHOT_BROKEN, fullPage: true });
} catch (e) {
  result.failure = String(e && e.stack ? e.stack : e);
  if (page) {
    result.last = await shown().catch(() => null);
    await page.screenshot({ path: process.env.SCREENSHOT_BROKEN, fullPage: true }).catch(() => {});
  }
} finally {
  await browser.close();
}
console.log(`RESULT ${JSON.stringify(result)}`);
process.exit(0);
