"""The browser playground at `/` in real headless Chromium (Debian's `chromium`, installed by
.ci/run; Playwright drives it through `executable_path`). Each test saves a screenshot
under test-artifacts/playground/. Every page is checked for Content-Security-Policy
violations and for requests leaving the service's origin."""

import io
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "playground"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package, installed by .ci/run
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "key-playground"


def cancelled(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'genserve_engine_requests_finished_total\{model="sd_digits",reason="cancelled"\} (\S+)', text)
    return float(match[1]) if match else 0.0


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)", pytrace=False)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page, with what it logged and every request it made."""

    def __init__(self, page, origin: str):
        self.page, self.origin = page, origin
        self.console, self.outside = [], []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("request", self._request)

    def _request(self, request):
        url = request.url
        if not (url.startswith(self.origin + "/") or url.startswith(("blob:", "data:"))):
            self.outside.append(url)

    def check(self):
        violations = [m for m in self.console if "Content Security Policy" in m or m.startswith("pageerror")]
        assert not violations, violations
        assert not self.outside, f"requests leaving the service: {self.outside}"


@pytest.fixture
def playground(browser, keyed_server):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    watched = Watched(page, keyed_server.url)
    page.goto(f"{keyed_server.url}/")
    expect(page.locator("#server-status")).to_contain_text("API key")  # keys are on: the page asks for one
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("API key").press("Tab")
    expect(page.locator("#server-status")).to_contain_text("Connected")
    yield page
    watched.check()
    context.close()


def test_generate_shows_previews_then_the_final_image(playground):
    from playwright.sync_api import expect

    page = playground
    page.get_by_label("Prompt").first.fill("a handwritten digit three")
    page.get_by_label("Steps").first.fill("30")
    page.get_by_label("Preview every (steps)").fill("3")
    page.get_by_label("Seed").first.fill("42")
    expect(page.get_by_label("DeepCache interval")).to_have_attribute("max", "10")  # from GET /v1/models
    page.get_by_label("DeepCache interval").fill("2")
    page.get_by_role("button", name="Generate").first.click()
    expect(page.locator("#t-status")).to_contain_text("Done", timeout=60_000)
    previews = page.locator("#t-previews img")
    expect(previews).to_have_count(1)
    assert 3 <= int(previews.get_attribute("data-step")) < 30  # a preview of the stream, before the end
    final = page.locator("#gallery li img").first
    expect(final).to_have_js_property("naturalWidth", 32)  # decoded: the image rendered
    item = page.locator("#gallery li").first
    expect(item).to_contain_text("42")
    assert page.locator("#gallery li a", has_text="Download").first.get_attribute("href").startswith("blob:")
    assert '"seed":42' in item.get_attribute("data-request")
    assert '"cache_interval":2' in item.get_attribute("data-request")
    expect(item).to_contain_text("cache_interval")
    page.screenshot(path=ARTIFACTS / "generate.png", full_page=True)
    page.get_by_label("Seed").first.fill("")
    item.get_by_role("button", name=re.compile("parameters of seed 42")).click()  # Reproduce
    expect(page.get_by_label("Seed").first).to_have_value("42")
    expect(page.get_by_label("DeepCache interval")).to_have_value("2")
    expect(page.get_by_role("button", name="Generate").first).to_be_focused()
    page.get_by_label("DeepCache interval").fill("1")


def test_cancel_stops_the_request_on_the_server(playground, keyed_server):
    from playwright.sync_api import expect

    page = playground
    before = cancelled(keyed_server.url)
    page.get_by_label("Steps").first.fill("150")
    page.get_by_label("Images").first.fill("8")
    page.get_by_label("Preview every (steps)").fill("0")
    page.get_by_role("button", name="Generate").first.click()
    expect(page.locator("#t-status")).to_contain_text("Step")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#t-status")).to_have_text("Cancelled")
    deadline = time.monotonic() + 10
    while cancelled(keyed_server.url) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled(keyed_server.url) == before + 1  # the server counted the cancellation
    expect(page.locator("#gallery li")).to_have_count(0)
    page.screenshot(path=ARTIFACTS / "cancel.png", full_page=True)


def test_a_bad_field_is_shown_and_marked(playground):
    from playwright.sync_api import expect

    page = playground
    steps = page.get_by_label("Steps").first
    steps.fill("500")
    page.get_by_role("button", name="Generate").first.click()
    alert = page.locator("#t-error")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("num_inference_steps")
    expect(alert).to_contain_text("150")  # the limit, from the server's error
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(steps).to_be_focused()
    page.screenshot(path=ARTIFACTS / "error.png", full_page=True)


def test_inpaint_with_a_drawn_mask_and_the_gan_tab(playground):
    from playwright.sync_api import expect

    page = playground
    page.get_by_role("tab", name="Text to image").focus()
    page.keyboard.press("ArrowRight")  # keyboard: the tabs move with the arrows
    expect(page.get_by_role("tab", name="Image to image / inpaint")).to_have_attribute("aria-selected", "true")
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 40).save(buffer, format="PNG")
    page.get_by_label("Image", exact=True).set_input_files(
        files=[{"name": "start.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    box = page.locator("#e-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] - 10, steps=8)
    page.mouse.up()
    page.locator("#e-steps").fill("10")
    page.locator("#e-seed").fill("7")
    page.locator("#e-generate").click()
    expect(page.locator("#e-status")).to_contain_text("Done")
    expect(page.locator("#gallery li").first).to_contain_text("inpaint")
    page.screenshot(path=ARTIFACTS / "inpaint.png", full_page=True)

    page.get_by_role("tab", name="GAN").click()
    page.locator("#g-seed").fill("3")
    page.locator("#g-count").fill("4")
    page.locator("#g-generate").click()
    expect(page.locator("#g-status")).to_contain_text("Done")
    expect(page.locator("#gallery li")).to_have_count(5)
    page.screenshot(path=ARTIFACTS / "gan.png", full_page=True)


def test_the_api_page_renders_from_local_files(browser, keyed_server):
    from playwright.sync_api import expect

    page = browser.new_page()
    watched = Watched(page, keyed_server.url)
    page.goto(f"{keyed_server.url}/v1/docs")
    expect(page.locator(".swagger-ui .info")).to_contain_text("genserve", timeout=30_000)
    expect(page.locator(".opblock-summary-path", has_text="/images/generations")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "docs.png")
    watched.check()
    page.close()


class _Fields(HTMLParser):
    def __init__(self):
        super().__init__()
        self.controls, self.labels, self.sources = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("input", "select", "textarea"):
            self.controls.append(a.get("id"))
        if tag == "label":
            self.labels.add(a.get("for"))
        if tag == "canvas":
            assert a.get("aria-label")
        self.sources += [a[k] for k in ("src", "href") if k in a]


def test_pages_are_local_labelled_and_locked_down(keyed_server):
    u = keyed_server.url
    for path in ("/", "/v1/docs"):
        r = httpx.get(u + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp
        parser = _Fields()
        parser.feed(r.text)
        assert all(s.startswith("/") for s in parser.sources), parser.sources  # nothing from another origin
        if path == "/":
            assert parser.controls and all(c in parser.labels for c in parser.controls)  # every control labelled
    for path in ("/playground/app.js", "/playground/style.css", "/playground/swagger/swagger-ui-bundle.js"):
        assert httpx.get(u + path).status_code == 200
    # BentoML's own Swagger page and its assets (which load Google Tag Manager) are not served
    for path in ("/docs.json", "/static_content/swagger-ui-bundle.js", "/static_content/index.css", "/v1/redoc"):
        assert httpx.get(u + path).status_code == 404, path



def photo_png(side: int = 64) -> bytes:
    """A real photo (a crop of scikit-image's astronaut) reduced to side x side, as PNG bytes."""
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()[20:276, 126:382]).resize((side, side), Image.Resampling.BICUBIC).save(
        buffer, format="PNG")
    return buffer.getvalue()


def test_the_tabs_of_every_served_family(playground):
    """The demo serves every family: StyleGAN mixing and interpolation, DDPM, VAE samples and
    latent interpolation, and upscaling a photo with the input beside the output."""
    from playwright.sync_api import expect

    page = playground
    tabs = page.get_by_role("tab")
    expect(tabs).to_have_text(["Text to image", "Image to image / inpaint", "GAN", "Style mix / interpolate",
                               "DDPM", "VAE", "Upscale / translate"])
    gallery = page.locator("#gallery li")

    page.get_by_role("tab", name="Upscale / translate").click()
    page.get_by_label("Model").locator("visible=true").select_option("realesr_animevideov3_x4")
    expect(page.locator("#u-run")).to_have_text("Upscale")
    page.get_by_label("Input image").set_input_files(
        files=[{"name": "astronaut.png", "mimeType": "image/png", "buffer": photo_png()}])
    expect(page.locator("#u-status")).to_contain_text("Input: 64x64")
    page.locator("#u-run").click()
    expect(page.locator("#u-status")).to_contain_text("64x64 → 256x256", timeout=60_000)
    expect(page.locator("#u-after")).to_have_js_property("naturalWidth", 256)  # decoded: the output rendered
    expect(page.locator("#u-before")).to_have_js_property("naturalWidth", 64)
    expect(page.locator("#u-after-caption")).to_contain_text("realesr_animevideov3_x4")
    assert page.locator("#u-before").bounding_box()["width"] == page.locator("#u-after").bounding_box()["width"]
    expect(gallery.first).to_contain_text("upscale")
    page.screenshot(path=ARTIFACTS / "upscale.png", full_page=True)

    page.get_by_role("tab", name="Style mix / interpolate").click()
    expect(page.locator("#s-crossover")).to_have_attribute("max", "8")  # num_ws, from GET /v1/models
    page.locator("#s-mix").click()
    expect(page.locator("#s-status")).to_contain_text("crossover at layer 4")
    expect(page.locator("#s-strip img")).to_have_count(3)
    expect(page.locator("#s-strip figcaption").nth(2)).to_contain_text("mixed")
    expect(gallery.first).to_contain_text("style mix")
    page.locator("#s-seeds").fill("1, x")
    page.locator("#s-interpolate").click()
    expect(page.locator("#s-error")).to_contain_text("seeds")
    expect(page.locator("#s-seeds")).to_have_attribute("aria-invalid", "true")
    page.locator("#s-seeds").fill("4, 5, 6")
    page.locator("#s-frames").fill("3")
    page.locator("#s-interpolate").click()
    expect(page.locator("#s-strip img")).to_have_count(5)  # 3 per segment, the shared middle frame once
    expect(page.locator("#s-strip figcaption")).to_have_text(["seed 4", "frame 2 of 5", "seed 5", "frame 4 of 5",
                                                              "seed 6"])
    expect(page.locator("#s-error")).to_be_hidden()
    page.screenshot(path=ARTIFACTS / "style.png", full_page=True)

    page.get_by_role("tab", name="DDPM").click()
    page.locator("#d-steps").fill("4")
    page.locator("#d-seed").fill("9")
    page.locator("#d-count").fill("2")
    page.locator("#d-generate").click()
    expect(page.locator("#d-status")).to_contain_text("Done: 2 image(s)", timeout=60_000)
    expect(gallery.first).to_contain_text("ddpm")
    assert '"seed":10' in gallery.first.get_attribute("data-request")  # image 1 of seed 9
    page.locator("#d-steps").fill("20")
    gallery.first.get_by_role("button", name=re.compile("parameters of seed 10")).click()  # Reproduce
    expect(page.locator("#d-steps")).to_have_value("4")
    expect(page.locator("#d-generate")).to_be_focused()

    page.get_by_role("tab", name="VAE").click()
    count = gallery.count()
    page.locator("#v-sample").click()
    expect(page.locator("#v-status")).to_contain_text("Done: 4 sample(s)")
    expect(gallery).to_have_count(count + 4)
    page.locator("#v-interpolate").click()
    expect(page.locator("#v-strip img")).to_have_count(8)
    expect(page.locator("#v-strip img").first).to_have_js_property("naturalWidth", 32)
    page.screenshot(path=ARTIFACTS / "vae.png", full_page=True)

    # Chained: the newest gallery image (a VAE sample, grey 32x32) through the translator.
    page.get_by_role("tab", name="Upscale / translate").click()
    page.get_by_label("Model").locator("visible=true").select_option("pix2pix_edges2digits")
    expect(page.locator("#u-run")).to_have_text("Translate")
    page.locator("#u-from-gallery").click()
    expect(page.locator("#u-status")).to_contain_text("Input: 32x32")
    page.locator("#u-run").click()
    expect(page.locator("#u-status")).to_contain_text("32x32 → 32x32")
    expect(gallery.first).to_contain_text("translate")


@pytest.fixture(scope="module")
def gan_and_upscaler_server(repository, tmp_path_factory):
    """A service whose repository holds one GAN and one upscaler only."""
    from tests.conftest import running_server

    folder = tmp_path_factory.mktemp("two_families")
    (folder / "repository").mkdir()
    for name in ("dcgan_digits", "realesr_animevideov3_x4"):
        (folder / "repository" / name).symlink_to(repository / name, target_is_directory=True)
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(folder / "repository"),
                               "GENSERVE_BACKEND": "onnxruntime"}, folder)


def test_tabs_appear_only_for_the_families_served(browser, gan_and_upscaler_server):
    from playwright.sync_api import expect

    page = browser.new_page()
    watched = Watched(page, gan_and_upscaler_server.url)
    page.goto(f"{gan_and_upscaler_server.url}/")
    expect(page.locator("#server-status")).to_contain_text("Connected: 2 models")
    expect(page.get_by_role("tab")).to_have_text(["GAN", "Upscale / translate"])
    expect(page.get_by_role("tab", name="GAN")).to_have_attribute("aria-selected", "true")  # text to image is gone
    expect(page.locator("#panel-txt2img")).to_be_hidden()
    page.get_by_role("tab", name="GAN").focus()
    page.keyboard.press("ArrowRight")  # the arrows skip the hidden tabs
    expect(page.get_by_role("tab", name="Upscale / translate")).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="GAN")).to_be_focused()
    watched.check()
    page.close()


@pytest.fixture(scope="module")
def lora_server(repository, tmp_path_factory):
    """The demo's sd_digits with adapter slots and one stored (random) adapter, `ink`."""
    import subprocess
    import sys

    import numpy as np

    from export.lora import graph_targets, store_adapter
    from tests.conftest import running_server
    from tests.fixtures.lora_files import random_adapter

    folder = tmp_path_factory.mktemp("lora_playground")
    repo = folder / "repository"
    for part in ("text_encoder", "unet", "vae_decoder"):
        shutil.copytree(repository / f"sd_digits_{part}", repo / f"sd_digits_{part}",
                        ignore=shutil.ignore_patterns("adapters", "model_lora.onnx", "*_lora"))
    subprocess.run([sys.executable, "-m", "export", "lora-slots", "--pipeline", "sd_digits", "--repository",
                    str(repo)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    targets = graph_targets(repo / "sd_digits_unet" / "1" / "model.onnx", "sd_digits_unet")
    store_adapter(random_adapter(targets, 8, np.random.default_rng(0)), repo, "sd_digits", "ink")
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(repo), "GENSERVE_WARMUP_BUDGET_S": "2"}, folder)


def test_the_lora_control_sends_the_adapter_and_reproduces_it(browser, lora_server, keyed_server):
    """Offered where the model serves adapters (not on the demo), sent as `lora`, shown in the
    gallery, and put back by Reproduce."""
    import json

    from playwright.sync_api import expect

    page = browser.new_page()
    watched = Watched(page, lora_server.url)
    page.goto(f"{lora_server.url}/")
    expect(page.locator("#server-status")).to_contain_text("Connected")
    expect(page.get_by_label("LoRA adapter")).to_be_visible()
    page.get_by_label("LoRA adapter").select_option("ink")
    page.get_by_label("LoRA scale").fill("0.6")
    page.locator("#t-prompt").fill("a handwritten digit 4")
    page.locator("#t-steps").fill("3")
    page.locator("#t-generate").click()
    item = page.locator("#gallery li").first
    expect(item).to_contain_text("ink × 0.6")
    sent = json.loads(item.get_attribute("data-request"))
    assert sent["lora"] == [{"name": "ink", "scale": 0.6}]
    page.get_by_label("LoRA adapter").select_option("")
    item.get_by_role("button", name=re.compile("Put the parameters")).click()
    expect(page.get_by_label("LoRA adapter")).to_have_value("ink")
    page.screenshot(path=str(ARTIFACTS / "lora.png"))
    watched.check()
    page.close()
    plain = browser.new_page()  # the demo serves no adapters: no control
    plain.goto(f"{keyed_server.url}/")
    expect(plain.locator("#t-lora-field")).to_be_hidden()
    plain.close()
