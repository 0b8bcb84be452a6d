"""transformers' SAM3 at toy width: the real architecture, built from a config in milliseconds."""


def toy_sam3_config(detr_layers: int = 6, dropout: float = 0.0):
    from transformers import Sam3Config
    from transformers.models.sam3.configuration_sam3 import Sam3ViTConfig, Sam3VisionConfig

    vit = Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=56, patch_size=14, window_size=2, global_attn_indexes=[1], pretrain_image_size=28)
    vision = Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=16, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]])
    small = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    return Sam3Config(
        vision_config=vision,
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
                     "bos_token_id": 62, "eos_token_id": 63, "pad_token_id": 0},
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": detr_layers, "dropout": dropout},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 3, "dropout": dropout},
        mask_decoder_config={"hidden_size": 16, "num_attention_heads": 2},
    )
