using System.CommandLine;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>`anyprec info`: what a model is, without loading its weights.</summary>
internal static class InfoCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var json = CommonOptions.Json();
        var command = new Command("info", "Show a model's format, shape and tensors.") { model, json };
        command.SetAction(r =>
        {
            using var cp = LlamaCheckpoint.Open(r.GetValue(model)!);
            var c = cp.Config;
            var info = new
            {
                path = cp.SourcePath,
                format = cp.Format.ToString(),
                dim = c.Dim, hidden_dim = c.HiddenDim, n_layers = c.Layers, n_heads = c.Heads, n_kv_heads = c.KvHeads,
                head_dim = c.HeadDim, vocab_size = c.VocabSize, max_seq_len = c.MaxSeqLen,
                rms_norm_eps = c.RmsNormEps, rope_theta = c.RopeTheta, rope_layout = c.RopeLayout.ToString(),
                tied_embeddings = c.TiedEmbeddings, parameters = c.ParameterCount,
                tensors = cp.TensorNames.Count,
                dtypes = cp.TensorNames.Select(n => cp[n].DType.Name()).Distinct().Order().ToArray(),
                tokenizer = cp.TokenizerPath,
            };
            if (r.GetValue(json)) { r.WriteJson(info); return 0; }
            var o = r.Out();
            o.WriteLine($"{info.path} ({info.format})");
            o.WriteLine($"  dim {c.Dim}, hidden {c.HiddenDim}, layers {c.Layers}, heads {c.Heads} (kv {c.KvHeads}, head dim {c.HeadDim})");
            o.WriteLine($"  vocab {c.VocabSize}, context {c.MaxSeqLen}, rope theta {c.RopeTheta} ({c.RopeLayout}), rms eps {c.RmsNormEps}");
            o.WriteLine($"  {c.ParameterCount:N0} parameters in {info.tensors} tensors ({string.Join(", ", info.dtypes)}), head {(c.TiedEmbeddings ? "tied to the embedding" : "separate")}");
            o.WriteLine($"  tokenizer: {info.tokenizer ?? "(none beside the model)"}");
            return 0;
        });
        return command;
    }
}
