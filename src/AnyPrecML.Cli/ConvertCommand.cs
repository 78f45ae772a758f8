using System.CommandLine;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>`anyprec convert`: write a Hugging Face directory from any supported checkpoint.</summary>
internal static class ConvertCommand
{
    public static Command Create()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var json = CommonOptions.Json();
        var output = new Option<string>("--output", "-o") { Description = "Directory to write (config.json, model.safetensors, tokenizer.model).", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "Stored precision of the tensors.", DefaultValueFactory = _ => "f32" };
        dtype.AcceptOnlyFromAmong("f32", "f16", "bf16");
        var overwrite = new Option<bool>("--overwrite") { Description = "Replace an existing output directory." };
        var command = new Command("convert", "Write a Hugging Face Llama directory (safetensors + config.json + tokenizer.model) from a llama2.c file or HF directory.")
        {
            model, tokenizer, output, dtype, overwrite, json,
        };
        command.SetAction(r =>
        {
            using var cp = LlamaCheckpoint.Open(r.GetValue(model)!);
            var dt = r.GetValue(dtype) switch { "f16" => DType.F16, "bf16" => DType.BF16, _ => DType.F32 };
            string? tok = r.GetValue(tokenizer) ?? cp.TokenizerPath;
            string outDir = r.GetValue(output)!;
            HuggingFaceExport.Write(cp, outDir, dt, tok, overwrite: r.GetValue(overwrite), progress: ConsoleProgress.Bytes(r.Err(), "convert"));
            if (r.GetValue(json)) r.WriteJson(new { output = Path.GetFullPath(outDir), dtype = dt.Name(), tokenizer = tok is not null });
            else r.Out().WriteLine($"wrote {Path.GetFullPath(outDir)} ({dt.Name()}{(tok is null ? ", no tokenizer found to copy" : "")})");
            return 0;
        });
        return command;
    }
}
