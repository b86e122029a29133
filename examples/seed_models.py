"""The seeds' modules, copied verbatim from the seed documents (000, 001, 002, 004).

They are what users run today: the examples convert them with ``mmattn.convert``
and compare, and the tests use them as oracles. Only the imports were added, and
classes the seeds name alike got distinct names (noted at each).
"""

# ruff: noqa
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import networkx as nx
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- seed 000_86b175ef21e6fd12.txt ------------------------------------------------------
class CrossModalAttention(nn.Module):
    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        value_dim: int,
        num_heads: int,
        dropout: float = 0.1
    ):
        super().__init__()
        
        self.num_heads = num_heads
        self.head_dim = query_dim // num_heads
        
        # Linear projections
        self.q_proj = nn.Linear(query_dim, query_dim)
        self.k_proj = nn.Linear(key_dim, query_dim)
        self.v_proj = nn.Linear(value_dim, query_dim)
        self.out_proj = nn.Linear(query_dim, query_dim)
        
        self.dropout = nn.Dropout(dropout)
        self.scale = math.sqrt(self.head_dim)
        
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_size = query.size(0)
        
        # Project Q, K, V
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        
        # Reshape for multi-head attention
        q = q.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        
        # Compute attention scores
        scores = torch.matmul(q, k.transpose(-2, -1)) / self.scale
        
        # Apply mask if provided
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float('-inf'))
        
        # Compute attention weights
        attention_weights = F.softmax(scores, dim=-1)
        attention_weights = self.dropout(attention_weights)
        
        # Apply attention weights to values
        context = torch.matmul(attention_weights, v)
        
        # Reshape back
        context = context.transpose(1, 2).contiguous().view(batch_size, -1, self.num_heads * self.head_dim)
        
        # Project output
        output = self.out_proj(context)
        
        return output, attention_weights


class MultimodalFusionModel(nn.Module):
    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        text_dim: int,
        hidden_dim: int,
        num_heads: int,
        num_classes: int,
        dropout: float = 0.1
    ):
        super().__init__()
        
        # Modality-specific encoders
        self.visual_encoder = nn.Linear(visual_dim, hidden_dim)
        self.audio_encoder = nn.Linear(audio_dim, hidden_dim)
        self.text_encoder = nn.Linear(text_dim, hidden_dim)
        
        # Cross-modal attention
        self.visual_audio_attention = CrossModalAttention(hidden_dim, hidden_dim, hidden_dim, num_heads)
        self.audio_visual_attention = CrossModalAttention(hidden_dim, hidden_dim, hidden_dim, num_heads)
        self.text_visual_attention = CrossModalAttention(hidden_dim, hidden_dim, hidden_dim, num_heads)
        
        # Layer normalization
        self.norm = nn.LayerNorm(hidden_dim)
        
        # Classification head
        self.classifier = nn.Sequential(
            nn.Linear(hidden_dim * 3, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes)
        )
        
    def forward(
        self,
        visual: torch.Tensor,
        audio: torch.Tensor,
        text: torch.Tensor,
        mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        # Encode modalities
        visual_features = self.visual_encoder(visual)
        audio_features = self.audio_encoder(audio)
        text_features = self.text_encoder(text)
        
        # Cross-modal attention
        visual_audio, va_weights = self.visual_audio_attention(visual_features, audio_features, audio_features, mask)
        audio_visual, av_weights = self.audio_visual_attention(audio_features, visual_features, visual_features, mask)
        text_visual, tv_weights = self.text_visual_attention(text_features, visual_features, visual_features, mask)
        
        # Layer normalization
        visual_audio = self.norm(visual_audio)
        audio_visual = self.norm(audio_visual)
        text_visual = self.norm(text_visual)
        
        # Global average pooling
        visual_audio = visual_audio.mean(dim=1)
        audio_visual = audio_visual.mean(dim=1)
        text_visual = text_visual.mean(dim=1)
        
        # Concatenate features
        combined = torch.cat([visual_audio, audio_visual, text_visual], dim=1)
        
        # Classification
        logits = self.classifier(combined)
        
        return logits, [va_weights, av_weights, tv_weights]


# --- seed 001_5aa5b7dd47f045c3.txt (nn.MultiheadAttention-based blocks) -----------------
class CrossModalAttentionBlock(nn.Module):  # the seed names it CrossModalAttention
    def __init__(self, d_model, num_heads, dropout=0.1):
        super().__init__()
        
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        
    def forward(self, query, key, value, mask=None):
        # query: modality A, key/value: modality B
        attended_output, attention_weights = self.attention(
            query, key, value, attn_mask=mask
        )
        
        # Residual connection and normalization
        output = self.norm(query + self.dropout(attended_output))
        
        return output, attention_weights


class MultimodalTransformer(nn.Module):
    def __init__(self, d_model, num_heads, num_layers):
        super().__init__()
        
        self.cross_attention_layers = nn.ModuleList([
            CrossModalAttentionBlock(d_model, num_heads)
            for _ in range(num_layers)
        ])
        
        self.self_attention_layers = nn.ModuleList([
            nn.MultiheadAttention(d_model, num_heads)
            for _ in range(num_layers)
        ])
        
        self.norm = nn.LayerNorm(d_model)
        
    def forward(self, modality_a, modality_b):
        # Cross-modal attention: A attends to B
        for cross_attn, self_attn in zip(self.cross_attention_layers, self.self_attention_layers):
            # Cross-attention
            modality_a, _ = cross_attn(modality_a, modality_b, modality_b)
            
            # Self-attention within modality A
            modality_a, _ = self_attn(modality_a, modality_a, modality_a)
        
        return self.norm(modality_a)


# --- seed 002_947d5963e3d0325f.txt ------------------------------------------------------
class CrossModalAttention002(nn.Module):  # the seed names it CrossModalAttention
    """
    Attention from one modality to another.
    Query from modality A, Key/Value from modality B.
    """
    def __init__(self, dim, num_heads=4):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
    
    def forward(self, query_modality, key_value_modality):
        # Add sequence dimension if needed
        if query_modality.dim() == 2:
            query_modality = query_modality.unsqueeze(1)
        if key_value_modality.dim() == 2:
            key_value_modality = key_value_modality.unsqueeze(1)
        
        attn_out, attn_weights = self.attention(
            query_modality, 
            key_value_modality, 
            key_value_modality
        )
        return attn_out.squeeze(1), attn_weights


class MultiModalTransformer(nn.Module):
    """Full multi-modal fusion with cross-attention."""
    def __init__(self, dim=256, num_heads=4, output_dim=10):
        super().__init__()
        # Cross-modal attention: each modality attends to others
        self.v_to_t = CrossModalAttention002(dim, num_heads)
        self.v_to_a = CrossModalAttention002(dim, num_heads)
        self.t_to_v = CrossModalAttention002(dim, num_heads)
        self.t_to_a = CrossModalAttention002(dim, num_heads)
        self.a_to_v = CrossModalAttention002(dim, num_heads)
        self.a_to_t = CrossModalAttention002(dim, num_heads)
        
        # Fusion
        self.fusion = nn.Linear(dim * 3, output_dim)
    
    def forward(self, visual, text, audio):
        # Cross-modal attention
        v_from_t, _ = self.v_to_t(visual, text)
        v_from_a, _ = self.v_to_a(visual, audio)
        v_enhanced = visual + v_from_t + v_from_a
        
        t_from_v, _ = self.t_to_v(text, visual)
        t_from_a, _ = self.t_to_a(text, audio)
        t_enhanced = text + t_from_v + t_from_a
        
        a_from_v, _ = self.a_to_v(audio, visual)
        a_from_t, _ = self.a_to_t(audio, text)
        a_enhanced = audio + a_from_v + a_from_t
        
        # Combine
        combined = torch.cat([v_enhanced, t_enhanced, a_enhanced], dim=-1)
        return self.fusion(combined)


def create_ws_cross_modal_mask(n_modalities, features_per_modality, k=4, beta=0.3):
    """
    Create a Watts-Strogatz connectivity pattern between modality features.
    """
    total_features = n_modalities * features_per_modality
    
    # Create WS graph
    G = nx.watts_strogatz_graph(total_features, k, beta, seed=42)
    adj = nx.to_numpy_array(G)
    
    return torch.FloatTensor(adj)


class WSMultiModalFusion(nn.Module):
    """Multi-modal fusion using Watts-Strogatz connectivity."""
    def __init__(self, n_modalities=3, features_per_modality=64, k=4, beta=0.3):
        super().__init__()
        total = n_modalities * features_per_modality
        
        # Learnable weights
        self.weight = nn.Parameter(torch.randn(total, total) * 0.01)
        
        # WS connectivity mask
        mask = create_ws_cross_modal_mask(n_modalities, features_per_modality, k, beta)
        self.register_buffer('mask', mask)
        
        self.n_modalities = n_modalities
        self.features_per_modality = features_per_modality
    
    def forward(self, features):
        # features: list of [batch, features_per_modality] tensors
        concat = torch.cat(features, dim=-1)  # [batch, total]
        
        # Apply sparse WS connectivity
        masked_weight = self.weight * self.mask
        output = F.linear(concat, masked_weight)
        
        return output
    
    def get_sparsity(self):
        return 1 - (self.mask.sum() / self.mask.numel()).item()


# --- seed 004_71d5c779e3fd21a2.txt ------------------------------------------------------
class GlobalSelfAttention(nn.Module):
    def __init__(self, hidden_dim=512, num_heads=8):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(hidden_dim, num_heads)
        self.layer_norm = nn.LayerNorm(hidden_dim)
        
    def forward(self, modality_features):
        # Concatenate features from all modalities
        combined_features = torch.cat(list(modality_features.values()), dim=1)
        
        # Apply global self-attention
        attended_features, _ = self.multihead_attn(
            combined_features, combined_features, combined_features
        )
        
        # Apply layer normalization
        output = self.layer_norm(attended_features + combined_features)
        return output


class SparseAttention(nn.Module):
    def __init__(self, block_size=64, sparsity_factor=0.8):
        super().__init__()
        self.block_size = block_size
        self.sparsity_factor = sparsity_factor
        
    def create_sparse_mask(self, seq_length):
        num_blocks = seq_length // self.block_size
        mask = torch.rand(num_blocks, num_blocks) > self.sparsity_factor
        return mask.repeat_interleave(self.block_size, dim=0).repeat_interleave(self.block_size, dim=1)
    
    def forward(self, Q, K, V):
        attention_mask = self.create_sparse_mask(Q.size(1))
        scores = torch.matmul(Q, K.transpose(-2, -1)) / math.sqrt(K.size(-1))
        scores.masked_fill_(~attention_mask, float('-inf'))
        attention_weights = torch.softmax(scores, dim=-1)
        return torch.matmul(attention_weights, V)
