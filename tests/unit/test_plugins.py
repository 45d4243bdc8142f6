"""Plugins are imported before the config is checked (docs/plugins.md): a variant a user's module registers
is known to the checks; a module that fails to import is one line naming it; entry points load too."""

from __future__ import annotations

import sys
import textwrap

import pytest

from lrexp import cli
from lrexp.config import plugins
from lrexp.config.load import load
from lrexp.config.plugins import PluginError
from lrexp.model.variants import VARIANTS, row_name

PLUGIN = textwrap.dedent('''
    from lrexp.layers import LayerSpec
    from lrexp.model.variants import register_variant


    def every_other_dense(cfg):
        """Sliding-window layers, every other one dense over the segment."""
        return [LayerSpec("attention", window=None if i % 2 else cfg.model.window) for i in range(cfg.model.num_layers)]


    register_variant("{name}", every_other_dense, lambda cfg: "Mixed:{{}}L".format(cfg.model.num_layers))
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder outside the project on sys.path; the variants and modules it adds are removed afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before_variants, before_loaded = dict(VARIANTS), set(plugins._loaded)
    yield tmp_path
    VARIANTS.clear()
    VARIANTS.update(before_variants)
    for path in tmp_path.glob("*.py"):  # only the plugins' own modules (the others, torch's and triton's, stay)
        sys.modules.pop(path.stem, None)
    plugins._loaded.clear()
    plugins._loaded.update(before_loaded)


def test_a_plugin_variant_passes_the_checks_from_an_override_and_a_file(plugin_dir, tmp_path, capsys):
    (plugin_dir / "my_rows.py").write_text(PLUGIN.format(name="mixed_a"))
    with pytest.raises(Exception, match="'model.variant' is 'mixed_a'"):
        load(overrides=["scale=smoke", "model.variant=mixed_a"])  # without the plugin: unknown
    cfg = load(overrides=["scale=smoke", "plugins=[my_rows]", "model.variant=mixed_a"])
    assert row_name(cfg) == "Mixed:4L" and cfg.plugins == ["my_rows"]
    config = tmp_path / "run.yaml"
    config.write_text("plugins: [my_rows]\nmodel:\n  variant: mixed_a\n")
    assert cli.main(["show-config", str(config), "scale=smoke"]) == 0
    assert "variant: mixed_a" in capsys.readouterr().out


def test_a_plugin_that_fails_to_import_is_one_line_naming_it(plugin_dir):
    (plugin_dir / "broken_plugin.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(PluginError) as err:
        load(overrides=["plugins=[broken_plugin]"])
    assert str(err.value) == ("plugin 'broken_plugin' failed to import: ModuleNotFoundError: No module named "
                              "'not_installed_anywhere'")
    with pytest.raises(PluginError, match="a plugin is a module name"):
        load(overrides=["plugins=[../my_rows.py]"])


def test_entry_points_of_the_group_are_imported(plugin_dir, monkeypatch):
    (plugin_dir / "ep_rows.py").write_text(PLUGIN.format(name="mixed_ep"))

    class EntryPoint:
        name, value = "ep_rows", "ep_rows"

        def load(self):
            return __import__("ep_rows")

    asked = []
    monkeypatch.setattr(plugins, "entry_points", lambda group: asked.append(group) or [EntryPoint()])
    assert load(overrides=["scale=smoke", "model.variant=mixed_ep"]).model.variant == "mixed_ep"
    assert asked == ["lrexp.plugins"]
