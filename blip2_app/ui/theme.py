"""Look and feel: a Gradio theme with system fonts (nothing fetched from the network) and CSS."""

from __future__ import annotations

import gradio as gr


def studio_theme() -> gr.themes.Base:
    system_sans: list[gr.themes.Font | str] = [
        gr.themes.Font("ui-sans-serif"),
        gr.themes.Font("system-ui"),
        "Segoe UI",
        "Roboto",
        "sans-serif",
    ]
    system_mono: list[gr.themes.Font | str] = [
        gr.themes.Font("ui-monospace"),
        "SFMono-Regular",
        "Menlo",
        "Consolas",
        "monospace",
    ]
    return gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="sky",
        neutral_hue="slate",
        radius_size="md",
        font=system_sans,
        font_mono=system_mono,
    ).set(
        block_title_text_weight="600",
        button_primary_text_color="white",
    )


CSS = """
.gradio-container { max-width: 1200px !important; margin: 0 auto !important; }
#studio-header { padding: 8px 4px 4px 4px; }
#studio-header h1 { font-size: 2rem; font-weight: 750; margin: 0 0 6px 0; letter-spacing: -0.02em; }
#studio-header h1 .accent { color: var(--color-accent); }
#studio-header a { padding: 0 !important; margin: 0 !important; }
#studio-header p.lead { max-width: 78ch; margin: 0 0 10px 0; color: var(--body-text-color-subdued); line-height: 1.5; }
#studio-header .badges { display: flex; flex-wrap: wrap; gap: 6px; margin: 0 0 4px 0; }
#studio-header .badge {
  display: inline-block; padding: 2px 10px; border-radius: 999px; font-size: 0.82rem;
  background: var(--color-accent-soft); color: var(--body-text-color); border: 1px solid var(--border-color-accent);
}
#studio-header .badge.warn { background: #fff7ed; border-color: #fdba74; color: #9a3412; }
#studio-header .notice {
  margin: 8px 0 4px 0; padding: 8px 12px; border-radius: 8px; line-height: 1.45; max-width: 100ch;
  background: #fff7ed; border: 1px solid #fdba74; color: #9a3412;
}
#studio-header .notice p { margin: 2px 0 !important; }
.hint { color: var(--body-text-color-subdued); font-size: 0.9rem; }
.hint p { margin: 4px 0 !important; }
#chat-input-row { align-items: stretch; }
#chat-send { min-width: 96px; }
#search-results .caption-label, #gallery-preview .caption-label {
  white-space: normal !important; text-overflow: clip !important; line-height: 1.35;
  left: var(--block-label-margin); max-width: none !important; background: rgba(255, 255, 255, 0.92);
}
#model-report table { font-size: 0.92rem; }
#model-report h3 { margin-top: 18px; }
@media (max-width: 640px) {
  #studio-header h1 { font-size: 1.5rem; }
  #studio-header a { padding: 0 !important; margin: 0 !important; }
#studio-header p.lead { font-size: 0.95rem; }
  .gradio-container { padding-left: 8px !important; padding-right: 8px !important; }
  #model-report { overflow-x: auto; }
  /* Six tabs do not fit a phone's width in one row: they wrap instead of widening the page. */
  .tab-wrapper { height: auto !important; }
  .tab-container { flex-wrap: wrap !important; height: auto !important; }
}
"""
