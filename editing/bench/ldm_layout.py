"""The original (CompVis/sgm) key layout of the UNet and VAE as names and shapes, written out from the LDM
modules' structure: for benchmarks that build full-size original-layout files (``editlab bench weights``) and
for the tests that build checkpoints in that layout."""

from __future__ import annotations

from ldm.config import UNetConfig, VAEConfig


def _ldm_resblock(p: str, cin: int, cout: int, emb: int) -> dict:
    shapes = {f"{p}in_layers.0.weight": (cin,), f"{p}in_layers.0.bias": (cin,),
              f"{p}in_layers.2.weight": (cout, cin, 3, 3), f"{p}in_layers.2.bias": (cout,),
              f"{p}emb_layers.1.weight": (cout, emb), f"{p}emb_layers.1.bias": (cout,),
              f"{p}out_layers.0.weight": (cout,), f"{p}out_layers.0.bias": (cout,),
              f"{p}out_layers.3.weight": (cout, cout, 3, 3), f"{p}out_layers.3.bias": (cout,)}
    if cin != cout:
        shapes.update({f"{p}skip_connection.weight": (cout, cin, 1, 1), f"{p}skip_connection.bias": (cout,)})
    return shapes


def _ldm_spatial_transformer(p: str, c: int, ctx: int, linear: bool, depth: int = 1) -> dict:
    proj = (c, c) if linear else (c, c, 1, 1)
    shapes = {f"{p}norm.weight": (c,), f"{p}norm.bias": (c,), f"{p}proj_in.weight": proj, f"{p}proj_in.bias": (c,),
              f"{p}proj_out.weight": proj, f"{p}proj_out.bias": (c,)}
    for k in range(depth):  # SDXL (sgm) stacks `depth` BasicTransformerBlocks
        b = f"{p}transformer_blocks.{k}."
        shapes.update({f"{b}ff.net.0.proj.weight": (8 * c, c), f"{b}ff.net.0.proj.bias": (8 * c,),
                       f"{b}ff.net.2.weight": (c, 4 * c), f"{b}ff.net.2.bias": (c,)})
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            shapes.update({f"{b}{attn}.to_q.weight": (c, c), f"{b}{attn}.to_k.weight": (c, kv),
                           f"{b}{attn}.to_v.weight": (c, kv), f"{b}{attn}.to_out.0.weight": (c, c),
                           f"{b}{attn}.to_out.0.bias": (c,)})
        for norm in ("norm1", "norm2", "norm3"):
            shapes.update({f"{b}{norm}.weight": (c,), f"{b}{norm}.bias": (c,)})
    return shapes


def ldm_unet_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of LDM's UNetModel for ``cfg`` (keys without ``model.diffusion_model.``)."""
    mc, L, last = cfg.model_channels, cfg.layers_per_level, len(cfg.channel_mult) - 1
    emb = mc * cfg.time_embed_dim_mult
    st = lambda p, c, level: _ldm_spatial_transformer(p, c, cfg.context_dim, cfg.linear_projection, cfg.depth_at(level))
    shapes = {"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
              "time_embed.2.bias": (emb,), "input_blocks.0.0.weight": (mc, cfg.in_channels, 3, 3),
              "input_blocks.0.0.bias": (mc,)}
    if cfg.addition_embed == "text_time":  # sgm: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        shapes.update({"label_emb.0.0.weight": (emb, cfg.addition_in_dim), "label_emb.0.0.bias": (emb,),
                       "label_emb.0.2.weight": (emb, emb), "label_emb.0.2.bias": (emb,)})
    n, ch, skips = 1, mc, [mc]
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(L):
            shapes.update(_ldm_resblock(f"input_blocks.{n}.0.", ch, mult * mc, emb))
            ch = mult * mc
            if cfg.attention_levels[level]:
                shapes.update(st(f"input_blocks.{n}.1.", ch, level))
            skips.append(ch)
            n += 1
        if level != last:
            shapes.update({f"input_blocks.{n}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{n}.0.op.bias": (ch,)})
            skips.append(ch)
            n += 1
    shapes.update(_ldm_resblock("middle_block.0.", ch, ch, emb))
    shapes.update(st("middle_block.1.", ch, -1))
    shapes.update(_ldm_resblock("middle_block.2.", ch, ch, emb))
    n = 0
    for level in reversed(range(len(cfg.channel_mult))):
        attention = cfg.attention_levels[level]
        for i in range(L + 1):
            shapes.update(_ldm_resblock(f"output_blocks.{n}.0.", ch + skips.pop(), cfg.channel_mult[level] * mc, emb))
            ch = cfg.channel_mult[level] * mc
            if attention:
                shapes.update(st(f"output_blocks.{n}.1.", ch, level))
            if level and i == L:
                up = f"output_blocks.{n}.{2 if attention else 1}.conv."
                shapes.update({up + "weight": (ch, ch, 3, 3), up + "bias": (ch,)})
            n += 1
    shapes.update({"out.0.weight": (mc,), "out.0.bias": (mc,), "out.2.weight": (cfg.out_channels, mc, 3, 3),
                   "out.2.bias": (cfg.out_channels,)})
    return shapes


def _ldm_vae_resnet(p: str, cin: int, cout: int) -> dict:
    shapes = {f"{p}norm1.weight": (cin,), f"{p}norm1.bias": (cin,), f"{p}conv1.weight": (cout, cin, 3, 3),
              f"{p}conv1.bias": (cout,), f"{p}norm2.weight": (cout,), f"{p}norm2.bias": (cout,),
              f"{p}conv2.weight": (cout, cout, 3, 3), f"{p}conv2.bias": (cout,)}
    if cin != cout:
        shapes.update({f"{p}nin_shortcut.weight": (cout, cin, 1, 1), f"{p}nin_shortcut.bias": (cout,)})
    return shapes


def _ldm_vae_mid(p: str, c: int) -> dict:
    shapes = {**_ldm_vae_resnet(f"{p}block_1.", c, c), **_ldm_vae_resnet(f"{p}block_2.", c, c),
              f"{p}attn_1.norm.weight": (c,), f"{p}attn_1.norm.bias": (c,)}
    for conv in ("q", "k", "v", "proj_out"):  # 1×1 convs in LDM
        shapes.update({f"{p}attn_1.{conv}.weight": (c, c, 1, 1), f"{p}attn_1.{conv}.bias": (c,)})
    return shapes


def ldm_vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of LDM's AutoencoderKL for ``cfg`` (keys without ``first_stage_model.``)."""
    chs, z, L = cfg.block_channels, cfg.latent_channels, cfg.layers_per_level
    shapes = {"encoder.conv_in.weight": (chs[0], cfg.in_channels, 3, 3), "encoder.conv_in.bias": (chs[0],)}
    cin = chs[0]
    for i, c in enumerate(chs):
        for j in range(L):
            shapes.update(_ldm_vae_resnet(f"encoder.down.{i}.block.{j}.", cin, c))
            cin = c
        if i != len(chs) - 1:
            shapes.update({f"encoder.down.{i}.downsample.conv.weight": (c, c, 3, 3), f"encoder.down.{i}.downsample.conv.bias": (c,)})
    shapes.update(_ldm_vae_mid("encoder.mid.", chs[-1]))
    shapes.update({"encoder.norm_out.weight": (chs[-1],), "encoder.norm_out.bias": (chs[-1],),
                   "encoder.conv_out.weight": (2 * z, chs[-1], 3, 3), "encoder.conv_out.bias": (2 * z,),
                   "decoder.conv_in.weight": (chs[-1], z, 3, 3), "decoder.conv_in.bias": (chs[-1],)})
    shapes.update(_ldm_vae_mid("decoder.mid.", chs[-1]))
    cin = chs[-1]
    for i in reversed(range(len(chs))):  # LDM builds the decoder deepest first but stores it as up[i]
        for j in range(L + 1):
            shapes.update(_ldm_vae_resnet(f"decoder.up.{i}.block.{j}.", cin, chs[i]))
            cin = chs[i]
        if i != 0:
            shapes.update({f"decoder.up.{i}.upsample.conv.weight": (cin, cin, 3, 3), f"decoder.up.{i}.upsample.conv.bias": (cin,)})
    shapes.update({"decoder.norm_out.weight": (chs[0],), "decoder.norm_out.bias": (chs[0],),
                   "decoder.conv_out.weight": (cfg.in_channels, chs[0], 3, 3), "decoder.conv_out.bias": (cfg.in_channels,),
                   "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
                   "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    return shapes
