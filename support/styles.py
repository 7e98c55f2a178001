"""QGIS styles (.qml) written beside the maps, so that QGIS opens them coloured and named by class (it loads
NAME.qml beside NAME.tif or NAME.gpkg itself): a paletted renderer for a class mask, one colour and name per
value; a categorized renderer on the `class` field for the polygons. The colours are the run's, those of the
click page and the overlays. QGIS 3.22 reads both as the layers' default styles.
"""
from xml.sax.saxutils import quoteattr

from support.cli import written


def mask_style(path, names, colours):
    """A class mask's style: value i drawn in colour i and named names[i]; no data (255) is not drawn."""
    entries = [f'<paletteEntry value="{i}" color="{hex_colour(c)}" alpha="255" label={quoteattr(n)}/>'
               for i, (n, c) in enumerate(zip(names, colours))]
    return write(path, [' <pipe>', '  <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1">',
                        '   <colorPalette>', *("    " + e for e in entries), '   </colorPalette>',
                        '  </rasterrenderer>', ' </pipe>'])


def polygon_style(path, names, colours, field="class"):
    """The polygons' style: each class filled in its colour, no outline, named in the legend."""
    categories = [f'<category value={quoteattr(n)} label={quoteattr(n)} symbol="{i}" render="true"/>'
                  for i, n in enumerate(names)]
    symbols = [f'<symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">'
               '<layer class="SimpleFill" enabled="1" locked="0" pass="0"><Option type="Map">'
               f'{option("color", "{},{},{},255".format(*c))}{option("style", "solid")}'
               f'{option("outline_style", "no")}</Option></layer></symbol>' for i, c in enumerate(colours)]
    renderer = f'<renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} forceraster="0">'
    return write(path, [" " + renderer, "  <categories>", *("   " + c for c in categories), "  </categories>",
                        "  <symbols>", *("   " + s for s in symbols), "  </symbols>", " </renderer-v2>"])


def hex_colour(rgb):
    return "#%02x%02x%02x" % tuple(rgb)


def option(name, value):
    return f'<Option type="QString" name="{name}" value="{value}"/>'


def write(path, lines):
    """A .qml file of the given lines inside QGIS's root element -> path."""
    head = ["<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>",
            '<qgis version="3.22.0" styleCategories="Symbology">']
    with written(path) as tmp:
        tmp.write_text("\n".join(head + lines + ["</qgis>", ""]), encoding="utf-8")
    return path
