// The headless Chromium the browser tests drive (playwright-core), shared by the drivers.
import { chromium } from "playwright-core";

// The flags that give headless Chromium a WebGPU adapter here (SwiftShader, on the CPU).
const args = [
  "--headless=new",
  "--no-sandbox",
  "--enable-unsafe-webgpu",
  "--enable-features=Vulkan",
  "--use-webgpu-adapter=swiftshader",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

// Chromium at $CHROMIUM, else Debian's /usr/bin/chromium.
export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args,
    headless: true,
  });
}
